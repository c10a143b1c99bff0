"""`kiln deploy ray` and `kiln deploy k8s`: kiln on Ray Serve, locally or on KubeRay."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kiln.cli.args import add_command
from kiln.cli.options import EngineOptions

if TYPE_CHECKING:
    from kiln.deploy.config import RayServeConfig


@dataclass
class ScaleOptions:
    """What each Ray Serve replica serves, what it reserves, and how many run.

    Args:
        model: local directory, .gguf file, exported artifact directory (kiln export: fast
            cold start) or hub id, as each replica's node sees it, as NAME=MODEL to name it
            (default: SmolLM2-135M). Give several to serve each as its own deployment behind
            one URL: OpenAI requests pick one by their `model`, others go to the first.
        models_config: a JSON file of more models, as kiln serve's --models-config: {"models":
            [{"name": "a", "model": "/models/a", "dtype": "bfloat16"}, ...], "default": "a"}.
        model_id: the name clients see of the (first) model (default: its path's last part).
        dtype: auto, float32, bfloat16 or float16.
        replicas: fixed number of replicas (without --max-replicas).
        min_replicas: autoscale from this many replicas (0: scale to zero when idle).
        max_replicas: autoscale up to this many replicas (turns autoscaling on).
        target_ongoing_requests: requests in flight per replica autoscaling aims at.
        upscale_delay_s: seconds load stays above target before a replica is added.
        downscale_delay_s: seconds load stays below target before a replica is removed.
        num_cpus: CPUs Ray reserves per replica.
        num_gpus: GPUs Ray reserves per replica.
        neuron_cores: AWS NeuronCores Ray reserves per replica.
        threads: torch threads per replica (default: num_cpus rounded down, at least 1).
        max_ongoing_requests: requests Ray sends one replica at once.
        max_concurrent_requests: requests in flight per replica before 429.
        api_key_env: environment variable holding the API key replicas require.
        port: the Serve HTTP port.
        ingress_replicas: replicas of the routing deployment in front of several models.
    """

    model: list[str] | None = None
    models_config: str | None = None
    model_id: str | None = None
    dtype: str = "auto"
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    neuron_cores: int = 0
    threads: int | None = None
    max_ongoing_requests: int = 32
    max_concurrent_requests: int = 128
    api_key_env: str | None = None
    port: int = 8000
    ingress_replicas: int = 1

    def config(
        self,
        engine: EngineOptions,
        host: str,
        chat_db: str | None = None,
        chat_db_env: str | None = None,
    ) -> RayServeConfig:
        from kiln.deploy.config import (
            AutoscalingConfig,
            ModelDeployment,
            RayServeConfig,
            ReplicaConfig,
            ReplicaResources,
        )

        autoscaling = None
        if self.max_replicas is not None:
            autoscaling = AutoscalingConfig(
                min_replicas=self.replicas if self.min_replicas is None else self.min_replicas,
                max_replicas=self.max_replicas,
                target_ongoing_requests=self.target_ongoing_requests,
                upscale_delay_s=self.upscale_delay_s,
                downscale_delay_s=self.downscale_delay_s,
            )
        engine_options = {"dtype": self.dtype, **engine.as_options()}
        replicas = [
            ReplicaConfig(
                model=model,
                model_id=model_id,
                engine={**engine_options, **options},
                threads=self.threads or max(1, math.floor(self.num_cpus)),
                max_concurrent_requests=self.max_concurrent_requests,
                chat_db=chat_db,
                chat_db_env=chat_db_env,
                api_key_env=self.api_key_env,
            )
            for model, model_id, options in self.models()
        ]
        resources = ReplicaResources(self.num_cpus, self.num_gpus, self.neuron_cores)
        # Every model's deployment gets the same scale options here; the emitted config's
        # `deployments` entries can be edited per model.
        more = tuple(
            ModelDeployment(
                replica=replica,
                resources=resources,
                num_replicas=self.replicas,
                autoscaling=autoscaling,
                max_ongoing_requests=self.max_ongoing_requests,
            )
            for replica in replicas[1:]
        )
        return RayServeConfig(
            replica=replicas[0],
            resources=resources,
            num_replicas=self.replicas,
            autoscaling=autoscaling,
            max_ongoing_requests=self.max_ongoing_requests,
            host=host,
            port=self.port,
            more_models=more,
            ingress_replicas=self.ingress_replicas,
        )

    def models(self) -> list[tuple[str | None, str | None, dict[str, Any]]]:
        """(model, model_id, engine options of its own) of each model, the default first.

        One plain --model keeps its id unset (the replica names it, as before several models
        existed); with several, each is named as kiln serve names it, so requests can pick it.
        """
        from kiln.errors import ConfigError
        from kiln.serving.models import ModelSpec, read_models_config

        given = self.model or []
        if not given and self.models_config is None:
            return [(None, self.model_id, {})]
        if len(given) == 1 and "=" not in given[0] and self.models_config is None:
            return [(given[0], self.model_id, {})]
        specs = [ModelSpec.parse(m) for m in given]
        default = None
        if self.models_config is not None:
            more, default = read_models_config(self.models_config)
            specs += more
        default = default or specs[0].name
        names = [s.name for s in specs]
        if default not in names:
            raise ConfigError(f"the default model {default!r} is none of {names}")
        specs.sort(key=lambda s: s.name != default)  # stable: the default first, others kept
        models = [(s.model, s.name, dict(s.options)) for s in specs]
        if self.model_id is not None:
            models[0] = (models[0][0], self.model_id, models[0][2])
        return models


def deploy_ray(
    scale: ScaleOptions,
    engine: EngineOptions,
    address: str | None = None,
    host: str = "127.0.0.1",
    db: str | None = None,
    emit_config: str | None = None,
) -> int:
    """Run kiln on Ray Serve: every replica serves kiln serve's routes behind Ray's proxy.

    Without --address, starts a local Ray cluster and serves until Ctrl-C or SIGTERM; with
    it, deploys to that cluster and returns (the application keeps running there).
    --emit-config writes a `serve run`/`serve deploy` config file instead of deploying.

    Args:
        address: an existing Ray cluster (ray://HOST:10001 or HOST:6379; default: local).
        host: the address Serve's HTTP proxy listens on.
        db: the web chat's store, as kiln serve's --db: a SQLite file on each replica's
            node, or a postgresql:// URL that every replica shares (default: in memory).
        emit_config: write the Serve config (YAML) to this file (- for stdout) and exit.
    """
    config = scale.config(engine, host, db)
    if emit_config is not None:
        import yaml

        text = yaml.safe_dump(config.serve_config(), sort_keys=False)
        _write(emit_config, text)
        return 0
    import signal
    import threading

    import ray
    from ray import serve

    from kiln.deploy.ray_serve import run

    url = run(config, address, blocking=False)
    print(f"kiln on Ray Serve: {url} (OpenAI API: {url}/v1, TGI API: {url}/generate)", flush=True)
    if address is not None:
        return 0
    stop = threading.Event()
    # NOTE: handlers for both signals: a process started in the background of a shell ignores
    # SIGINT, and a container runtime stops it with SIGTERM; either must shut Ray down cleanly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        # The local cluster lives as long as this process. A timed wait lets the handler run.
        while not stop.wait(1.0):
            pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def deploy_k8s(
    scale: ScaleOptions,
    engine: EngineOptions,
    image: str,
    name: str = "kiln",
    accelerator: str = "cpu",
    min_workers: int = 1,
    max_workers: int = 2,
    worker_cpu: str = "2",
    worker_memory: str = "8Gi",
    devices_per_worker: int = 1,
    chat_storage: str | None = "1Gi",
    storage_class: str | None = None,
    api_key_secret: str | None = None,
    db_secret: str | None = None,
    output: str = "-",
) -> int:
    """Write Kubernetes manifests for KubeRay: a RayService (CPU head, autoscaled worker group,
    serveConfigV2 = the config `kiln deploy ray --emit-config` writes), a Service on port 80,
    and the web chat's volume claim.

    Args:
        image: the container image of the Ray pods (built from kiln's Dockerfile).
        name: the RayService's name and prefix of the other objects.
        accelerator: cpu, nvidia (nvidia.com/gpu) or neuron (aws.amazon.com/neuron).
        min_workers: fewest worker pods.
        max_workers: most worker pods.
        worker_cpu: CPUs per worker pod.
        worker_memory: memory per worker pod (Kubernetes quantity, e.g. 8Gi).
        devices_per_worker: GPUs or Neuron devices per worker pod.
        chat_storage: the chat store's volume size (e.g. 1Gi; "none": no volume).
        storage_class: the volume's storage class (default: the cluster's).
        api_key_secret: a Secret whose `api-key` entry becomes the --api-key-env variable of
            the worker pods (kubectl create secret generic NAME --from-literal=api-key=KEY).
        db_secret: a Secret whose `url` entry is a postgresql:// URL: the chat store every
            replica shares, instead of a volume (kubectl create secret generic NAME
            --from-literal=url=postgresql://USER:PASSWORD@HOST/DB).
        output: the manifest file (- for stdout).
    """
    from kiln.deploy.kuberay import CHAT_DB_ENV, CHAT_MOUNT, ClusterSpec, manifests, to_yaml

    storage = None if chat_storage in (None, "none") or db_secret else chat_storage
    chat_db = f"{CHAT_MOUNT}/chat.sqlite3" if storage else None
    chat_db_env = CHAT_DB_ENV if db_secret else None
    config = scale.config(engine, "0.0.0.0", chat_db, chat_db_env)
    cluster = ClusterSpec(
        name=name,
        image=image,
        accelerator=accelerator,
        min_workers=min_workers,
        max_workers=max_workers,
        worker_cpu=worker_cpu,
        worker_memory=worker_memory,
        devices_per_worker=devices_per_worker,
        chat_storage=storage,
        storage_class=storage_class,
        api_key_secret=api_key_secret,
        db_secret=db_secret,
    )
    _write(output, to_yaml(manifests(cluster, config)))
    return 0


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def add_deploy_commands(commands: Any) -> None:
    """``kiln deploy ray`` and ``kiln deploy k8s``."""
    deploy = commands.add_parser("deploy", help="scale out on Ray Serve, locally or on KubeRay")
    targets = deploy.add_subparsers(title="targets", required=True, metavar="TARGET")
    add_command(targets, deploy_ray, "ray")
    add_command(targets, deploy_k8s, "k8s")
