"""Kubernetes manifests for kiln on KubeRay: a ``RayService``, a ``Service`` and the chat store.

The ``RayService`` carries a Ray cluster (a CPU head that runs no replicas, one autoscaled worker
group per accelerator) and, as ``serveConfigV2``, the same Serve config ``kiln deploy ray
--emit-config`` writes: one config, local or on Kubernetes. Plain dicts, written as YAML by the
CLI; no Kubernetes client and no Ray import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from kiln.deploy.config import RayServeConfig
from kiln.errors import ConfigError

ACCELERATORS = ("cpu", "nvidia", "neuron")

# The Kubernetes extended resource and the node taint each accelerator's device plugin and node
# pools use (NVIDIA's and AWS's device plugins; EKS GPU and Inferentia node groups taint so).
_DEVICE_RESOURCE = {"nvidia": "nvidia.com/gpu", "neuron": "aws.amazon.com/neuron"}

RAY_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001, "serve": 8000}
DASHBOARD_AGENT_PORT = 52365
CHAT_MOUNT = "/data"
CHAT_DB_ENV = "KILN_CHAT_DB"
"""The variable worker pods get the chat store's PostgreSQL URL in (from ``db_secret``)."""


@dataclass(frozen=True)
class ClusterSpec:
    """The Kubernetes side of a deployment: image, pods and their sizes.

    Args:
        name: the RayService's name (and prefix of the other objects').
        image: the container image of every Ray pod (kiln and Ray installed; see Dockerfile).
        accelerator: cpu, nvidia or neuron: what worker pods request.
        min_workers: fewest worker pods.
        max_workers: most worker pods (KubeRay's autoscaler adds pods for pending replicas).
        worker_cpu: CPUs per worker pod.
        worker_memory: memory per worker pod (Kubernetes quantity).
        devices_per_worker: GPUs or Neuron devices per worker pod (cpu: ignored).
        head_cpu: CPUs of the head pod.
        head_memory: memory of the head pod.
        chat_storage: size of the chat store's volume (None: no volume, chats in memory).
        storage_class: the volume's storage class (None: the cluster's default).
        idle_timeout_s: how long an idle worker pod lives before the autoscaler removes it.
        api_key_secret: a Secret whose ``api-key`` entry worker pods get as the replica's
            ``api_key_env`` variable (None: no API key).
        db_secret: a Secret whose ``url`` entry (a ``postgresql://`` URL) worker pods get as
            the replica's ``chat_db_env`` variable: every replica then shares one PostgreSQL
            chat store, and no volume is claimed.
    """

    name: str
    image: str
    accelerator: str = "cpu"
    min_workers: int = 1
    max_workers: int = 2
    worker_cpu: str = "2"
    worker_memory: str = "8Gi"
    devices_per_worker: int = 1
    head_cpu: str = "1"
    head_memory: str = "4Gi"
    chat_storage: str | None = "1Gi"
    storage_class: str | None = None
    idle_timeout_s: int = 60
    api_key_secret: str | None = None
    db_secret: str | None = None

    def __post_init__(self) -> None:
        if self.db_secret is not None and self.chat_storage is not None:
            raise ConfigError("the chat store is a volume or a PostgreSQL secret, not both")
        if self.accelerator not in ACCELERATORS:
            raise ConfigError(f"accelerator must be one of {', '.join(ACCELERATORS)}")
        if not 0 <= self.min_workers <= self.max_workers or self.max_workers < 1:
            raise ConfigError("need 0 <= min_workers <= max_workers and max_workers >= 1")


def manifests(cluster: ClusterSpec, serve: RayServeConfig) -> list[dict[str, Any]]:
    """Every object to ``kubectl apply``: the chat volume (if any), the RayService, a Service."""
    objects: list[dict[str, Any]] = []
    if cluster.chat_storage is not None:
        objects.append(chat_volume_claim(cluster))
    objects.append(ray_service(cluster, serve))
    objects.append(http_service(cluster))
    return objects


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (``serveConfigV2``) as literal blocks, readable in the manifest, and
    no anchors/aliases (``*id001``), which some Kubernetes tooling does not follow."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False)


def ray_service(cluster: ClusterSpec, serve: RayServeConfig) -> dict[str, Any]:
    if cluster.accelerator == "neuron" and not serve.resources.neuron_cores:
        raise ConfigError("accelerator neuron: give each replica neuron_cores")
    if cluster.accelerator == "nvidia" and not serve.resources.num_gpus:
        raise ConfigError("accelerator nvidia: give each replica num_gpus")
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": cluster.name, "labels": _labels(cluster)},
        "spec": {
            # NOTE: a string, as KubeRay wants it: the exact file `serve deploy` would read.
            "serveConfigV2": yaml.safe_dump(serve.serve_config(), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": _ray_version(),
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": cluster.idle_timeout_s,
                },
                "headGroupSpec": _head_group(cluster),
                "workerGroupSpecs": [_worker_group(cluster, serve)],
            },
        },
    }


def http_service(cluster: ClusterSpec) -> dict[str, Any]:
    """Port 80 to Serve's HTTP proxy on the pods KubeRay marks as serving (``ray.io/serve``)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{cluster.name}-http", "labels": _labels(cluster)},
        "spec": {
            "type": "ClusterIP",
            "selector": {**_labels(cluster), "ray.io/serve": "true"},
            "ports": [{"name": "http", "port": 80, "targetPort": RAY_PORTS["serve"]}],
        },
    }


def chat_volume_claim(cluster: ClusterSpec) -> dict[str, Any]:
    """The web chat's SQLite store, mounted on every worker pod.

    NOTE: ReadWriteMany because every worker pod mounts it; SQLite over a network filesystem
    is safe for one writing pod only, so beyond one worker use a PostgreSQL store
    (``db_secret``) instead.
    """
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": cluster.chat_storage}},
    }
    if cluster.storage_class is not None:
        spec["storageClassName"] = cluster.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": f"{cluster.name}-chat", "labels": _labels(cluster)},
        "spec": spec,
    }


def _labels(cluster: ClusterSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kiln", "app.kubernetes.io/instance": cluster.name}


def _ray_version() -> str:
    try:
        import ray

        return str(ray.__version__)
    except ImportError:
        return "2.60.0"  # the version kiln's Ray Serve app was written and tested against


def _http_probe(path: str, port: int, period_s: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period_s,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def _head_group(cluster: ClusterSpec) -> dict[str, Any]:
    resources = {"cpu": cluster.head_cpu, "memory": cluster.head_memory}
    return {
        # NOTE: num-cpus 0 keeps replicas off the head: losing a worker must not take the
        # head (and with it the whole cluster) down with an out-of-memory model.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": {
            "metadata": {"labels": _labels(cluster)},
            "spec": {
                "containers": [
                    {
                        "name": "ray-head",
                        "image": cluster.image,
                        "resources": {"requests": resources, "limits": resources},
                        "ports": [
                            {"name": name, "containerPort": port}
                            for name, port in RAY_PORTS.items()
                        ],
                        "readinessProbe": _http_probe("/api/gcs_healthz", 8265, 5, 10),
                        "livenessProbe": _http_probe("/api/gcs_healthz", 8265, 10, 30),
                    }
                ]
            },
        },
    }


def _worker_group(cluster: ClusterSpec, serve: RayServeConfig) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": cluster.worker_cpu, "memory": cluster.worker_memory}
    start_params: dict[str, str] = {}
    pod: dict[str, Any] = {}
    device = _DEVICE_RESOURCE.get(cluster.accelerator)
    if device is not None:
        limits[device] = str(cluster.devices_per_worker)
        pod["tolerations"] = [{"key": device, "operator": "Exists", "effect": "NoSchedule"}]
    if cluster.accelerator == "neuron":
        # Ray does not detect NeuronCores by itself on every version: declare them (2 per
        # Inferentia2 / Trainium device), as the custom resource replicas ask for.
        cores = 2 * cluster.devices_per_worker
        start_params["resources"] = f'"{{\\"neuron_cores\\": {cores}}}"'
    container: dict[str, Any] = {
        "name": "ray-worker",
        "image": cluster.image,
        "resources": {"requests": dict(limits), "limits": limits},
        # Ready once this pod's Serve proxy answers; alive while its raylet does.
        "readinessProbe": _http_probe("/-/healthz", RAY_PORTS["serve"], 5, 10),
        "livenessProbe": _http_probe("/api/local_raylet_healthz", DASHBOARD_AGENT_PORT, 10, 30),
        "ports": [{"name": "serve", "containerPort": RAY_PORTS["serve"]}],
    }
    env: list[dict[str, Any]] = []
    if cluster.api_key_secret is not None:
        if serve.replica.api_key_env is None:
            raise ConfigError("an API key secret needs the replicas' api_key_env")
        secret = {"name": cluster.api_key_secret, "key": "api-key"}
        env.append({"name": serve.replica.api_key_env, "valueFrom": {"secretKeyRef": secret}})
    if cluster.db_secret is not None:
        if serve.replica.chat_db_env is None:
            raise ConfigError("a database secret needs the replicas' chat_db_env")
        secret = {"name": cluster.db_secret, "key": "url"}
        env.append({"name": serve.replica.chat_db_env, "valueFrom": {"secretKeyRef": secret}})
    if env:
        container["env"] = env
    if cluster.chat_storage is not None:
        container["volumeMounts"] = [{"name": "chat", "mountPath": CHAT_MOUNT}]
        pod["volumes"] = [
            {"name": "chat", "persistentVolumeClaim": {"claimName": f"{cluster.name}-chat"}}
        ]
    return {
        "groupName": f"{cluster.accelerator}-workers",
        "replicas": cluster.min_workers,
        "minReplicas": cluster.min_workers,
        "maxReplicas": cluster.max_workers,
        "rayStartParams": start_params,
        "template": {
            "metadata": {"labels": _labels(cluster)},
            "spec": {"containers": [container], **pod},
        },
    }
