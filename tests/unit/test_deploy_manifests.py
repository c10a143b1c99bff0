"""`kiln deploy ray --emit-config` and `kiln deploy k8s`: the files they write, parsed back.

The Serve config is checked against Ray's own schema (``ray.serve.schema``); the KubeRay
manifests field group by field group. Nothing is deployed here (tests/e2e/test_ray_serve.py
deploys an emitted config on a local Ray cluster).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from kiln.cli.main import main
from kiln.deploy.config import (
    BUILDER_IMPORT_PATH,
    DEPLOYMENT_NAME,
    INGRESS_DEPLOYMENT_NAME,
    MODELS_BUILDER_IMPORT_PATH,
    AutoscalingConfig,
    ModelDeployment,
    RayServeConfig,
    ReplicaConfig,
    ReplicaResources,
)
from kiln.errors import ConfigError


def _emit(tmp_path: Path, *flags: str) -> dict[str, Any]:
    path = tmp_path / "serve.yaml"
    assert main(["deploy", "ray", "--model", "/models/m", *flags, "--emit-config", str(path)]) == 0
    return yaml.safe_load(path.read_text())


def _k8s(tmp_path: Path, *flags: str) -> dict[str, dict[str, Any]]:
    path = tmp_path / "k8s.yaml"
    argv = ["deploy", "k8s", "--model", "/models/m", "--image", "kiln:test", *flags]
    assert main([*argv, "--output", str(path)]) == 0
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text())}


def test_fixed_replicas_config_validates_against_rays_schema(tmp_path: Path) -> None:
    config = _emit(tmp_path, "--replicas", "3", "--num-cpus", "0.5", "--threads", "1")
    schema = ServeDeploySchema.model_validate(config)
    [app] = schema.applications
    assert app.import_path == BUILDER_IMPORT_PATH
    [deployment] = app.deployments
    assert deployment.name == DEPLOYMENT_NAME
    assert deployment.num_replicas == 3
    assert deployment.ray_actor_options.num_cpus == 0.5
    # The args are what the builder reads back into each replica's config.
    replica = ReplicaConfig.from_args(app.args)
    assert replica.model == "/models/m" and replica.threads == 1


def test_autoscaling_config_validates_and_scales_to_zero(tmp_path: Path) -> None:
    config = _emit(
        tmp_path,
        *("--min-replicas", "0", "--max-replicas", "4", "--target-ongoing-requests", "3"),
        *("--upscale-delay-s", "5", "--downscale-delay-s", "120"),
    )
    [deployment] = ServeDeploySchema.model_validate(config).applications[0].deployments
    autoscaling = deployment.autoscaling_config
    assert autoscaling["min_replicas"] == 0 and autoscaling["max_replicas"] == 4
    assert autoscaling["target_ongoing_requests"] == 3
    assert autoscaling["upscale_delay_s"] == 5 and autoscaling["downscale_delay_s"] == 120
    assert "num_replicas" not in config["applications"][0]["deployments"][0]


def test_gpu_and_neuron_resources_reach_ray_actor_options(tmp_path: Path) -> None:
    gpu = _emit(tmp_path, "--num-gpus", "1")["applications"][0]["deployments"][0]
    assert gpu["ray_actor_options"]["num_gpus"] == 1
    neuron = _emit(tmp_path, "--neuron-cores", "2")["applications"][0]["deployments"][0]
    assert neuron["ray_actor_options"]["resources"] == {"neuron_cores": 2}


def test_bad_engine_option_fails_before_anything_is_written() -> None:
    with pytest.raises(ConfigError, match="unknown option"):
        ReplicaConfig(engine={"max_num_seqz": 4})


def test_k8s_objects_and_serve_config_embedded(tmp_path: Path) -> None:
    docs = _k8s(tmp_path, "--replicas", "2")
    assert set(docs) == {"RayService", "Service", "PersistentVolumeClaim"}
    spec = docs["RayService"]["spec"]
    assert docs["RayService"]["apiVersion"] == "ray.io/v1"
    # serveConfigV2 is a string holding the very config `serve deploy` takes.
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    assert serve_config["applications"][0]["deployments"][0]["num_replicas"] == 2
    assert serve_config["http_options"]["host"] == "0.0.0.0"


def test_k8s_head_and_worker_groups(tmp_path: Path) -> None:
    docs = _k8s(tmp_path, "--min-workers", "1", "--max-workers", "5", "--worker-cpu", "4")
    cluster = docs["RayService"]["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265, 8000} <= head_ports
    [workers] = cluster["workerGroupSpecs"]
    assert (workers["minReplicas"], workers["maxReplicas"]) == (1, 5)
    container = workers["template"]["spec"]["containers"][0]
    assert container["image"] == "kiln:test"
    assert container["resources"]["limits"]["cpu"] == "4"


def test_k8s_autoscaler_options(tmp_path: Path) -> None:
    cluster = _k8s(tmp_path, "--max-replicas", "4")["RayService"]["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0


def test_k8s_probes(tmp_path: Path) -> None:
    cluster = _k8s(tmp_path)["RayService"]["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert head["readinessProbe"]["httpGet"] == {"path": "/api/gcs_healthz", "port": 8265}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": 8000}
    assert worker["livenessProbe"]["httpGet"]["path"] == "/api/local_raylet_healthz"


@pytest.mark.parametrize(
    ("accelerator", "flags", "device"),
    [
        ("nvidia", ["--num-gpus", "1"], "nvidia.com/gpu"),
        ("neuron", ["--neuron-cores", "2"], "aws.amazon.com/neuron"),
    ],
)
def test_k8s_accelerator_resources(
    tmp_path: Path, accelerator: str, flags: list[str], device: str
) -> None:
    docs = _k8s(tmp_path, "--accelerator", accelerator, "--devices-per-worker", "2", *flags)
    [workers] = docs["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert workers["groupName"] == f"{accelerator}-workers"
    pod = workers["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"][device] == "2"
    assert pod["tolerations"][0]["key"] == device
    if accelerator == "neuron":
        assert "neuron_cores" in workers["rayStartParams"]["resources"]


def test_k8s_accelerator_without_replica_devices_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "k8s.yaml"
    argv = ["deploy", "k8s", "--image", "kiln:test", "--accelerator", "nvidia", "--output"]
    assert main([*argv, str(path)]) == 2
    assert "num_gpus" in capsys.readouterr().err
    assert not path.exists()


def test_k8s_service_and_chat_store(tmp_path: Path) -> None:
    docs = _k8s(tmp_path, "--chat-storage", "5Gi", "--storage-class", "efs")
    service = docs["Service"]["spec"]
    assert service["ports"] == [{"name": "http", "port": 80, "targetPort": 8000}]
    assert service["selector"]["ray.io/serve"] == "true"
    claim = docs["PersistentVolumeClaim"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert claim["spec"]["storageClassName"] == "efs"
    # Every worker mounts it, and every replica keeps its chats there.
    workers = docs["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    pod = workers["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    args = yaml.safe_load(docs["RayService"]["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["chat_db"].startswith(mount + "/")


def test_k8s_without_chat_store(tmp_path: Path) -> None:
    docs = _k8s(tmp_path, "--chat-storage", "none")
    assert "PersistentVolumeClaim" not in docs
    args = yaml.safe_load(docs["RayService"]["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["chat_db"] is None


def test_k8s_api_key_comes_from_a_secret_not_the_config(tmp_path: Path) -> None:
    flags = ("--api-key-env", "KILN_API_KEY", "--api-key-secret", "kiln-key")
    docs = _k8s(tmp_path, *flags)
    workers = docs["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    [env] = workers["template"]["spec"]["containers"][0]["env"]
    assert env == {
        "name": "KILN_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "kiln-key", "key": "api-key"}},
    }
    args = yaml.safe_load(docs["RayService"]["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["api_key_env"] == "KILN_API_KEY"


def test_k8s_postgres_store_comes_from_a_secret(tmp_path: Path) -> None:
    """--db-secret: every replica shares one PostgreSQL store whose URL (password included)
    reaches the pods from a Secret, never the config KubeRay shows; no volume is claimed."""
    flags = ("--api-key-env", "KILN_API_KEY", "--api-key-secret", "kiln-key")
    docs = _k8s(tmp_path, "--db-secret", "kiln-db", *flags)
    assert "PersistentVolumeClaim" not in docs
    workers = docs["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    pod = workers["template"]["spec"]
    assert "volumes" not in pod and "volumeMounts" not in pod["containers"][0]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in pod["containers"][0]["env"]}
    assert env == {
        "KILN_API_KEY": {"name": "kiln-key", "key": "api-key"},
        "KILN_CHAT_DB": {"name": "kiln-db", "key": "url"},
    }
    serve_config = yaml.safe_load(docs["RayService"]["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    args = serve_config["applications"][0]["args"]
    assert args["chat_db"] is None
    assert args["chat_db_env"] == "KILN_CHAT_DB"


def test_replica_store_is_a_path_or_a_variable_not_both() -> None:
    with pytest.raises(ConfigError, match="chat_db or chat_db_env"):
        ReplicaConfig(chat_db="/data/chat.sqlite3", chat_db_env="KILN_CHAT_DB")


def test_replica_reads_its_store_url_from_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.deploy.ray_serve import _from_env

    monkeypatch.setenv("KILN_CHAT_DB", "postgresql://kiln:secret@db/kiln")
    assert _from_env("KILN_CHAT_DB", "chat_db_env") == "postgresql://kiln:secret@db/kiln"
    assert _from_env(None, "chat_db_env") is None
    monkeypatch.delenv("KILN_CHAT_DB")
    with pytest.raises(ConfigError, match=r"chat_db_env: \$KILN_CHAT_DB is not set"):
        _from_env("KILN_CHAT_DB", "chat_db_env")


# --- several models: one deployment per model behind one ingress ------------------------------


def _emit_models(tmp_path: Path, *flags: str) -> dict[str, Any]:
    path = tmp_path / "serve.yaml"
    assert main(["deploy", "ray", *flags, "--emit-config", str(path)]) == 0
    return yaml.safe_load(path.read_text())


def test_two_models_config_validates_with_a_deployment_per_model(tmp_path: Path) -> None:
    flags = ("--model", "a=/models/a", "--model", "/models/b", "--replicas", "2")
    config = _emit_models(tmp_path, *flags, "--num-cpus", "0.5", "--threads", "1")
    [app] = ServeDeploySchema.model_validate(config).applications
    assert app.import_path == MODELS_BUILDER_IMPORT_PATH
    ingress, *models = app.deployments
    assert ingress.name == INGRESS_DEPLOYMENT_NAME and ingress.num_replicas == 1
    assert [d.name for d in models] == ["kiln-a", "kiln-b"]
    for deployment in models:
        assert deployment.num_replicas == 2
        assert deployment.ray_actor_options.num_cpus == 0.5
    # Each model's args are named (the ingress routes by these names), the default first.
    replicas = [ReplicaConfig.from_args(m) for m in app.args["models"]]
    assert [(r.model, r.model_id, r.threads) for r in replicas] == [
        ("/models/a", "a", 1),
        ("/models/b", "b", 1),
    ]


def test_each_model_deployment_keeps_its_own_options() -> None:
    config = RayServeConfig(
        replica=ReplicaConfig(model="/models/a", model_id="a"),
        num_replicas=3,
        more_models=(
            ModelDeployment(
                replica=ReplicaConfig(model="/models/big"),
                resources=ReplicaResources(num_cpus=2, num_gpus=1),
                autoscaling=AutoscalingConfig(min_replicas=0, max_replicas=4),
                max_ongoing_requests=8,
            ),
        ),
        ingress_replicas=2,
    ).serve_config()
    [app] = ServeDeploySchema.model_validate(config).applications
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {INGRESS_DEPLOYMENT_NAME, "kiln-a", "kiln-big"}
    assert deployments[INGRESS_DEPLOYMENT_NAME].num_replicas == 2
    assert deployments["kiln-a"].num_replicas == 3
    assert deployments["kiln-a"].ray_actor_options.num_gpus == 0
    big = deployments["kiln-big"]
    assert big.autoscaling_config["max_replicas"] == 4
    assert big.ray_actor_options.num_gpus == 1 and big.max_ongoing_requests == 8
    assert "num_replicas" not in config["applications"][0]["deployments"][2]


def test_the_ingress_is_the_route_and_binds_every_model() -> None:
    from kiln.deploy.ray_serve import build_models_app

    args = {"models": [{"model": "/models/a"}, {"model": "/models/b", "model_id": "bee"}]}
    app = build_models_app(args)
    # The builder's returned deployment is what Ray's HTTP proxy sends requests to.
    ingress = app._bound_deployment
    assert ingress.name == INGRESS_DEPLOYMENT_NAME
    models, default = ingress.init_args
    assert default == "a"
    assert {k: v._bound_deployment.name for k, v in models.items()} == {
        "a": "kiln-a",
        "bee": "kiln-bee",
    }


def test_models_config_file_names_models_and_picks_the_default(tmp_path: Path) -> None:
    models = tmp_path / "models.json"
    entries = [{"name": "x", "model": "/models/x"}, {"model": "/models/y", "dtype": "bfloat16"}]
    models.write_text(json.dumps({"models": entries, "default": "y"}))
    config = _emit_models(tmp_path, "--models-config", str(models))
    [app] = ServeDeploySchema.model_validate(config).applications
    assert [d.name for d in app.deployments] == [INGRESS_DEPLOYMENT_NAME, "kiln-y", "kiln-x"]
    y, x = (ReplicaConfig.from_args(m) for m in app.args["models"])
    assert (y.model_id, y.engine["dtype"]) == ("y", "bfloat16")
    assert (x.model_id, x.engine["dtype"]) == ("x", "auto")


def test_one_model_named_inline_keeps_the_single_deployment(tmp_path: Path) -> None:
    config = _emit_models(tmp_path, "--model", "tiny=/models/m")
    [app] = ServeDeploySchema.model_validate(config).applications
    assert app.import_path == BUILDER_IMPORT_PATH
    assert [d.name for d in app.deployments] == [DEPLOYMENT_NAME]
    assert app.args["model_id"] == "tiny"


def test_two_models_under_one_id_are_refused() -> None:
    with pytest.raises(ConfigError, match="own model_id"):
        RayServeConfig(
            replica=ReplicaConfig(model="/a/m"),
            more_models=(ModelDeployment(replica=ReplicaConfig(model="/b/m")),),
        )


def test_k8s_embeds_the_several_model_config(tmp_path: Path) -> None:
    docs = _k8s(tmp_path, "--model", "other=/models/other", "--api-key-env", "KILN_API_KEY")
    serve_config = yaml.safe_load(docs["RayService"]["spec"]["serveConfigV2"])
    [app] = ServeDeploySchema.model_validate(serve_config).applications
    assert app.import_path == MODELS_BUILDER_IMPORT_PATH
    assert [d.name for d in app.deployments] == [INGRESS_DEPLOYMENT_NAME, "kiln-m", "kiln-other"]
    # Every model's replicas get the store and the key variable the pods are given.
    for args in app.args["models"]:
        assert args["chat_db"] and args["api_key_env"] == "KILN_API_KEY"
