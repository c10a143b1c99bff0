"""Typed configuration of kiln on Ray Serve: what each replica serves, and how many run where.

Plain data, no Ray import: ``kiln deploy ray --emit-config`` and ``kiln deploy k8s`` write
configs on machines without Ray, and a bad value fails here, before any cluster is touched.

A :class:`RayServeConfig` becomes, in one place each:

- :meth:`RayServeConfig.deployment_options`: the keyword arguments of Ray Serve's
  ``Deployment.options`` (replicas or autoscaling, ``ray_actor_options``);
- :meth:`RayServeConfig.serve_config`: a ``serve run``/``serve deploy`` config file (Ray's
  ``ServeDeploySchema``), also KubeRay's ``serveConfigV2``; its application's ``args`` are
  :meth:`ReplicaConfig.to_args`, which the builder ``kiln.deploy.ray_serve:build_app`` reads back.

Several models (``more_models``) make one application of one deployment per model
(:class:`ModelDeployment`, each with its own replicas and resources) behind a small ingress
deployment that routes each request by its ``model``: clients keep one base URL. Its builder is
``kiln.deploy.ray_serve:build_models_app``, its ``args`` ``{"models": [replica args, ...]}``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from kiln.config.engine_args import EngineArgs
from kiln.errors import ConfigError

BUILDER_IMPORT_PATH = "kiln.deploy.ray_serve:build_app"
"""What a Serve config's ``import_path`` names: a function from ``args`` to the application."""

DEPLOYMENT_NAME = "KilnReplica"
"""The deployment's name inside its application (``serve status`` lists it)."""

MODELS_BUILDER_IMPORT_PATH = "kiln.deploy.ray_serve:build_models_app"
"""The builder of a several-model application: ``args`` are ``{"models": [...]}``."""

INGRESS_DEPLOYMENT_NAME = "KilnIngress"
"""The deployment that routes a several-model application's requests to its models."""

INGRESS_MAX_ONGOING_REQUESTS = 1024
"""Requests one ingress replica holds at once: it only awaits the model deployments, whose own
``max_ongoing_requests`` and Ray's queue in front of them do the limiting."""

NEURON_CORES_RESOURCE = "neuron_cores"
"""The custom Ray resource Neuron worker nodes declare (the data-on-eks blueprint's name)."""


@dataclass(frozen=True)
class ReplicaConfig:
    """What one replica loads and serves: the same options as ``kiln serve``.

    Args:
        model: local directory, .gguf file, exported artifact directory or hub id, as each
            replica's node sees it (None: kiln's default model).
        model_id: the name clients see (default: the model path's last part).
        engine: more :class:`~kiln.config.engine_args.EngineArgs` options (dtype,
            kv_cache_memory, max_num_seqs...).
        threads: torch CPU threads per replica (None: torch's choice).
        max_concurrent_requests: requests in flight per replica before 429.
        max_input_tokens: longest prompt accepted (default: the context minus one).
        max_total_tokens: longest prompt + max_new_tokens accepted (default: the context).
        chat_db: the web chat's store: a SQLite file on the replica's node or a
            ``postgresql://`` URL (None: in memory, per replica).
        chat_db_env: the environment variable holding the store's URL instead (a PostgreSQL
            URL carries its password: kept out of the config file, like the API key).
        api_key_env: the environment variable holding the API key each replica requires
            (kept out of the config file, which `serve status` and KubeRay show to anyone).
    """

    model: str | None = None
    model_id: str | None = None
    engine: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    max_concurrent_requests: int = 128
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    chat_db: str | None = None
    chat_db_env: str | None = None
    api_key_env: str | None = None

    def __post_init__(self) -> None:
        self.engine_args()  # unknown or out-of-range engine options fail now
        if self.chat_db is not None and self.chat_db_env is not None:
            raise ConfigError("give chat_db or chat_db_env, not both")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.max_concurrent_requests < 1:
            raise ConfigError(
                f"max_concurrent_requests must be >= 1, got {self.max_concurrent_requests}"
            )

    def engine_args(self) -> EngineArgs:
        return EngineArgs.from_options(self.model, self.engine, "replica engine options")

    def served_name(self) -> str:
        """The name clients see: ``model_id``, else the name ``kiln serve`` gives the model."""
        if self.model_id:
            return self.model_id
        # NOTE: imported here: kiln.serving is heavier than this module's plain data.
        from kiln.serving.models import default_name

        return default_name(self.model)

    def to_args(self) -> dict[str, Any]:
        """Plain data for a Serve config's ``args`` (YAML/JSON-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ReplicaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ConfigError(f"unknown replica option(s) {', '.join(unknown)}")
        return cls(**args)


@dataclass(frozen=True)
class AutoscalingConfig:
    """Ray Serve autoscaling: replicas follow the requests in flight per replica.

    Args:
        min_replicas: fewest replicas; 0 scales to zero when idle (the next request waits for
            a cold start).
        max_replicas: most replicas.
        initial_replicas: replicas at deploy time (default: min_replicas).
        target_ongoing_requests: requests in flight per replica that autoscaling aims at.
        upscale_delay_s: how long load must stay above target before replicas are added.
        downscale_delay_s: how long load must stay below target before replicas are removed.
        downscale_to_zero_delay_s: idle time before the last replica goes (min_replicas 0;
            default: downscale_delay_s).
        metrics_interval_s: how often replicas report their load.
        look_back_period_s: the window the load is averaged over.
    """

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    downscale_to_zero_delay_s: float | None = None
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ConfigError(
                f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                f"{self.min_replicas}..{self.max_replicas}"
            )
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ConfigError(f"initial_replicas {initial} is outside min..max replicas")
        if self.target_ongoing_requests <= 0:
            raise ConfigError("target_ongoing_requests must be > 0")

    def ray_options(self) -> dict[str, Any]:
        """Ray Serve's ``autoscaling_config`` (unset optional fields left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class ReplicaResources:
    """What Ray reserves for each replica (it places a replica only where these are free).

    Args:
        num_cpus: logical CPUs (fractions allowed).
        num_gpus: NVIDIA GPUs (fractions share one).
        neuron_cores: AWS NeuronCores (custom resource ``neuron_cores``).
        memory: bytes of memory to reserve (None: none reserved).
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    neuron_cores: int = 0
    memory: int | None = None

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0 or self.neuron_cores < 0:
            raise ConfigError("replica resources must be >= 0")

    def ray_actor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.neuron_cores:
            options["resources"] = {NEURON_CORES_RESOURCE: self.neuron_cores}
        if self.memory is not None:
            options["memory"] = self.memory
        return options


@dataclass(frozen=True)
class ModelDeployment:
    """One model's deployment in a several-model application: what it serves, what each of its
    replicas reserves, and how many run (the same options as :class:`RayServeConfig`'s own).

    Args:
        replica: what each replica serves (its ``model_id`` is what requests name).
        resources: what each replica reserves.
        num_replicas: fixed replica count (ignored when ``autoscaling`` is set).
        autoscaling: replicas that follow the load instead of a fixed count.
        max_ongoing_requests: requests Ray sends one replica at once.
        health_check_period_s: how often Ray asks each replica whether its engine runs.
    """

    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    resources: ReplicaResources = field(default_factory=ReplicaResources)
    num_replicas: int = 1
    autoscaling: AutoscalingConfig | None = None
    max_ongoing_requests: int = 32
    health_check_period_s: float = 10.0

    def __post_init__(self) -> None:
        if self.autoscaling is None and self.num_replicas < 1:
            raise ConfigError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if self.max_ongoing_requests < 1:
            raise ConfigError("max_ongoing_requests must be >= 1")

    @property
    def name(self) -> str:
        """The deployment's name: ``kiln-<model id>``, with what Ray's names cannot hold
        (``#`` separates the parts of its actor names) replaced by ``-``."""
        return model_deployment_name(self.replica.served_name())

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of Ray Serve's ``Deployment.options``."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": self.resources.ray_actor_options(),
            "health_check_period_s": self.health_check_period_s,
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.ray_options()
        else:
            options["num_replicas"] = self.num_replicas
        return options


def model_deployment_name(model_id: str) -> str:
    """The deployment serving ``model_id`` in a several-model application."""
    return "kiln-" + re.sub(r"[^A-Za-z0-9._-]", "-", model_id)


@dataclass(frozen=True)
class RayServeConfig:
    """One kiln application on Ray Serve.

    Args:
        replica: what each replica serves.
        resources: what each replica reserves.
        num_replicas: fixed replica count (ignored when ``autoscaling`` is set).
        autoscaling: replicas that follow the load instead of a fixed count.
        max_ongoing_requests: requests Ray sends one replica at once; more wait in Ray's
            queue. kiln batches them, so this is near the engine's max_num_seqs, not Ray's 5.
        app_name: the Serve application's name.
        route_prefix: the HTTP path the application is served under.
        host: the Serve HTTP proxy's address.
        port: the Serve HTTP proxy's port.
        health_check_period_s: how often Ray asks each replica whether its engine runs.
        more_models: more models, each its own deployment, served beside ``replica``'s (the
            default model, for requests that name none) behind one ingress deployment that
            routes OpenAI requests by their ``model``.
        ingress_replicas: replicas of that ingress deployment.
        ingress_num_cpus: CPUs each ingress replica reserves (it only forwards requests).
    """

    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    resources: ReplicaResources = field(default_factory=ReplicaResources)
    num_replicas: int = 1
    autoscaling: AutoscalingConfig | None = None
    max_ongoing_requests: int = 32
    app_name: str = "kiln"
    route_prefix: str = "/"
    host: str = "0.0.0.0"
    port: int = 8000
    health_check_period_s: float = 10.0
    more_models: tuple[ModelDeployment, ...] = ()
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.25

    def __post_init__(self) -> None:
        # The default model's deployment checks its own options (replicas, max_ongoing...).
        deployments = self.model_deployments()
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        if self.ingress_replicas < 1 or self.ingress_num_cpus < 0:
            raise ConfigError("need ingress_replicas >= 1 and ingress_num_cpus >= 0")
        ids = [d.replica.served_name() for d in deployments]
        names = [d.name for d in deployments]
        if len(set(ids)) != len(ids) or len(set(names)) != len(names):
            raise ConfigError(f"each model needs its own model_id, got {ids}")

    def model_deployments(self) -> list[ModelDeployment]:
        """Each model's deployment, the default model's (``replica``'s) first."""
        first = ModelDeployment(
            replica=self.replica,
            resources=self.resources,
            num_replicas=self.num_replicas,
            autoscaling=self.autoscaling,
            max_ongoing_requests=self.max_ongoing_requests,
            health_check_period_s=self.health_check_period_s,
        )
        return [first, *self.more_models]

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of Ray Serve's ``Deployment.options`` (the default model's)."""
        return self.model_deployments()[0].deployment_options()

    def ingress_options(self) -> dict[str, Any]:
        """``Deployment.options`` of a several-model application's ingress deployment."""
        return {
            "num_replicas": self.ingress_replicas,
            "max_ongoing_requests": INGRESS_MAX_ONGOING_REQUESTS,
            "ray_actor_options": {"num_cpus": self.ingress_num_cpus},
        }

    def models_args(self) -> dict[str, Any]:
        """A several-model application's builder ``args``: every model's replica options,
        each named (the ingress routes by these names, so none is left to a default)."""
        replicas = [d.replica for d in self.model_deployments()]
        named = [dataclasses.replace(r, model_id=r.served_name()) for r in replicas]
        return {"models": [r.to_args() for r in named]}

    def serve_config(self) -> dict[str, Any]:
        """A ``serve run``/``serve deploy`` config (``ray.serve.schema.ServeDeploySchema``)."""
        if self.more_models:
            import_path = MODELS_BUILDER_IMPORT_PATH
            args = self.models_args()
            deployments = [{"name": INGRESS_DEPLOYMENT_NAME, **self.ingress_options()}]
            deployments += [
                {"name": d.name, **d.deployment_options()} for d in self.model_deployments()
            ]
        else:
            # One model: no ingress, today's single deployment (its replicas serve every route).
            import_path = BUILDER_IMPORT_PATH
            args = self.replica.to_args()
            deployments = [{"name": DEPLOYMENT_NAME, **self.deployment_options()}]
        return {
            "proxy_location": "EveryNode",
            "http_options": {"host": self.host, "port": self.port},
            "applications": [
                {
                    "name": self.app_name,
                    "route_prefix": self.route_prefix,
                    "import_path": import_path,
                    "args": args,
                    "deployments": deployments,
                }
            ],
        }
