"""kiln on a real local Ray cluster: replicas behind Ray Serve's HTTP proxy, real HTTP.

The module deploys two replicas of stories260K (half a CPU and one torch thread each) once; the
fast tests check spreading, streaming and the blueprint's ``/infer`` through Ray's proxy. The
``slow`` ones kill a replica, and deploy an emitted config with ``serve run`` to watch
autoscaling from 1 to 2 replicas under load.

NOTE: ``ray`` is imported plainly: it is in the ``test`` extra, so a missing Ray is a failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray import serve

from kiln.cli.main import main
from kiln.deploy.config import (
    DEPLOYMENT_NAME,
    RayServeConfig,
    ReplicaConfig,
    ReplicaResources,
)
from kiln.deploy.ray_serve import REPLICA_HEADER, run

APP = "kiln"
PROMPT = "Once upon a time"
# NOTE: a bound on waiting for Ray (replica restarts, autoscaling), not a timing assertion.
WAIT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_states(app: str = APP) -> dict[str, int]:
    status = serve.status().applications.get(app)
    if status is None:
        return {}
    deployment = status.deployments.get(DEPLOYMENT_NAME)
    if deployment is None:
        return {}
    return {str(k): v for k, v in deployment.replica_states.items()}


def _replica_actor_names(app: str = APP) -> dict[str, str]:
    """Replica id -> the actor name of every live replica of ``app``."""
    prefix = f"SERVE_REPLICA::{app}#{DEPLOYMENT_NAME}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return {n.removeprefix(prefix): n for n in names if n.startswith(prefix)}


def _wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {WAIT_S} s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def url(cluster: None, stories_dir: Path) -> str:
    config = RayServeConfig(
        replica=ReplicaConfig(
            model=str(stories_dir), threads=1, engine={"kv_cache_memory": 16 << 20}
        ),
        resources=ReplicaResources(num_cpus=0.5),
        num_replicas=2,
        app_name=APP,
        host="127.0.0.1",
        port=_free_port(),
    )
    return run(config)


def _generate(url: str, max_new_tokens: int = 8) -> httpx.Response:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": max_new_tokens}}
    return httpx.post(f"{url}/generate", json=body, timeout=60)


def test_requests_spread_across_both_replicas(url: str) -> None:
    answers = [_generate(url) for _ in range(16)]
    assert all(r.status_code == 200 for r in answers)
    seen = {r.headers[REPLICA_HEADER] for r in answers}
    assert seen == set(_replica_actor_names())
    assert len(seen) == 2
    # Both replicas run the same model the same way: greedy answers agree.
    assert len({r.json()["generated_text"] for r in answers}) == 1


def test_tgi_stream_through_ray_matches_the_plain_answer(url: str) -> None:
    expected = _generate(url, 12).json()["generated_text"]
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 12}}
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers[REPLICA_HEADER] in _replica_actor_names()
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) == 12
    assert "".join(e["token"]["text"] for e in events) == expected
    assert events[-1]["generated_text"] == expected


def test_openai_stream_through_ray(url: str) -> None:
    [model] = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=60).json()["data"]]
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(line[5:])["choices"][0]["text"] for line in lines[:-1])
    assert text == _generate(url, 6).json()["generated_text"]


def test_infer_route_of_the_ray_blueprint(url: str) -> None:
    r = httpx.get(f"{url}/infer", params={"sentence": PROMPT}, timeout=60)
    assert r.status_code == 200
    [text] = r.json()
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)


@pytest.mark.slow
def test_killed_replica_loses_no_later_request_and_is_restarted(url: str) -> None:
    before = _replica_actor_names()
    victim_id, victim = sorted(before.items())[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    answers = [_generate(url) for _ in range(12)]
    assert [r.status_code for r in answers] == [200] * 12
    assert victim_id not in {r.headers[REPLICA_HEADER] for r in answers}

    def replaced() -> bool:
        now = _replica_actor_names()
        return victim_id not in now and len(now) == 2 and _replica_states() == {"RUNNING": 2}

    _wait_for(replaced, "Ray to replace the killed replica")
    answers = [_generate(url) for _ in range(16)]
    assert {r.headers[REPLICA_HEADER] for r in answers} == set(_replica_actor_names())


@pytest.mark.slow
def test_emitted_config_deploys_with_serve_run_and_autoscales(
    url: str, stories_dir: Path, tmp_path: Path
) -> None:
    # Make room: the autoscaled app gets the cluster's CPUs to itself. NOTE: Serve itself is
    # shut down, not just the app, so that `serve run` starts it on the config's port.
    serve.shutdown()
    port = _free_port()
    path = tmp_path / "serve.yaml"
    argv = ["deploy", "ray", "--model", str(stories_dir), "--num-cpus", "0.5", "--threads", "1"]
    argv += ["--max-replicas", "2", "--min-replicas", "1", "--target-ongoing-requests", "1"]
    argv += ["--upscale-delay-s", "1", "--kv-cache-memory", str(16 << 20)]
    argv += ["--port", str(port), "--emit-config", str(path)]
    assert main(argv) == 0
    config = yaml.safe_load(path.read_text())
    # Ray's own metrics cadence (10 s / 30 s) would make the test slow, not different.
    autoscaling = config["applications"][0]["deployments"][0]["autoscaling_config"]
    autoscaling.update(metrics_interval_s=0.5, look_back_period_s=2)
    path.write_text(yaml.safe_dump(config))

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "serve"), "run", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        app_url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: _replica_states() == {"RUNNING": 1}, "the emitted config to deploy")
        assert _generate(app_url).status_code == 200

        stop = threading.Event()
        codes: list[int] = []

        def load() -> None:
            body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 200, "ignore_eos": True}}
            while not stop.is_set():
                codes.append(httpx.post(f"{app_url}/generate", json=body, timeout=120).status_code)

        workers = [threading.Thread(target=load) for _ in range(4)]
        for w in workers:
            w.start()
        try:
            _wait_for(lambda: _replica_states() == {"RUNNING": 2}, "autoscaling to 2 replicas")
            seen: set[str] = set()
            _wait_for(
                lambda: seen.add(_generate(app_url).headers[REPLICA_HEADER]) or len(seen) == 2,
                "the second replica to answer",
            )
        finally:
            stop.set()
            for w in workers:
                w.join()
        assert codes and set(codes) == {200}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
