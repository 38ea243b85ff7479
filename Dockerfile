# syntax=docker/dockerfile:1
# Tandem's cloud worker and OpenAI-compatible gateway, CPU only. docs/operating.md says how to
# build, run and deploy it, and the CUDA variant (deploy/cuda.Dockerfile).
#
#   docker build -t tandem:cpu .                           # "runtime": no models; mount them
#   docker build --target reference -t tandem:reference .  # plus the reference models
#
# Stages: "builder" compiles llama-cpp-python (a C++ source build: compilers and cmake stay in
# this stage) into a virtual environment; "runtime" is python slim + that environment + a
# non-root user; "reference" adds the reference models, built here from the bundled data sets
# (nothing is downloaded when a container runs).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch's CPU wheel (the default PyPI wheel pulls in CUDA: gigabytes a CPU host never uses).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Pins: the CPU torch (cpu.txt) and the set the last passing CI installed (tested.txt).
ARG CONSTRAINTS="-c constraints/cpu.txt -c constraints/tested.txt"
# The extras baked in: llm (llama.cpp, transformers, the gateway's server), otel (OTLP traces).
# Add ray for Ray Serve deployments (about 1 GB more).
ARG EXTRAS=llm,otel
# llama.cpp for any x86-64 with AVX2 (not -march=native: the image runs on other CPUs).
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF"
WORKDIR /src
COPY constraints/ constraints/
# The heavy dependencies first, in their own layers: a source change does not rebuild them.
RUN pip install --extra-index-url "$TORCH_INDEX" $CONSTRAINTS torch
RUN CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    pip install $CONSTRAINTS "llama-cpp-python[server]>=0.3.16"
COPY pyproject.toml README.md ./
COPY tandem/ tandem/
COPY runtime/ runtime/
COPY kernels/ kernels/
COPY router/ router/
COPY edge/ edge/
COPY cloud/ cloud/
COPY bench/ bench/
COPY reference/ reference/
# A wheel install (not editable): the image holds no source tree.
RUN pip install --extra-index-url "$TORCH_INDEX" $CONSTRAINTS ".[$EXTRAS]" \
 && tandem --help > /dev/null

FROM ${PYTHON_IMAGE} AS runtime
# libgomp: llama.cpp's OpenMP threads (torch and onnxruntime bring their own).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /home/tandem --create-home tandem
COPY --from=builder /opt/venv /opt/venv
# /srv/tandem: the configs (read-only), models/ (mounted, or baked in by "reference") and
# state/ (the gateway's escalation log: the one place the processes write).
WORKDIR /srv/tandem
COPY deploy/worker.yaml deploy/gateway-policy.yaml /srv/tandem/
COPY deploy/healthcheck.py /usr/local/bin/tandem-healthcheck
RUN mkdir -p /srv/tandem/models /srv/tandem/state \
 && chown tandem:tandem /srv/tandem/state \
 && chmod 0755 /usr/local/bin/tandem-healthcheck
# Offline: nothing is fetched from a model hub at run time; no progress bars in JSON logs.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TANDEM_CACHE_DIR=/home/tandem/.cache/tandem \
    TANDEM_HTTP_PORT=9100 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TQDM_DISABLE=1
USER tandem
VOLUME ["/srv/tandem/state"]
# 5555: the worker's ZeroMQ socket; 9100: the worker's HTTP /metrics, /health, /ready;
# 8000: the gateway (OpenAI API, /metrics, /health, /ready).
EXPOSE 5555 9100 8000
# The worker drains on SIGTERM (finishes queued work, answers ShuttingDown for drain.grace_ms).
STOPSIGNAL SIGTERM
# GET /health on TANDEM_HTTP_PORT (9100 for a worker; the gateway's service sets 8000).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["tandem-healthcheck"]
ENTRYPOINT ["tandem"]
# Binds 0.0.0.0 without Curve, so it refuses to start until a deployment chooses: Curve keys
# (deploy/multi-host/worker.yaml) or --insecure on a private network (deploy/compose.yaml).
CMD ["cloud", "serve", "--config", "/srv/tandem/worker.yaml", "--log-format", "json"]

FROM runtime AS reference
# The reference models, trained here from data sets that ship inside scikit-learn (seconds to
# a minute): digits-cloud (ONNX) and chat-cloud (a transformers Qwen2 directory) for the
# worker, chat-edge-q8_0.gguf for the gateway's device tier. Deterministic (seed 0).
USER root
RUN tandem models build --out /srv/tandem/models \
 && tandem models build --chat --out /tmp/chat \
 && tandem models add /tmp/chat/chat-cloud --name chat-cloud --models-dir /srv/tandem/models \
 && cp /tmp/chat/chat-edge-q8_0.gguf /srv/tandem/models/ \
 && rm -rf /tmp/chat /root/.cache \
 && chmod -R a+rX /srv/tandem/models
USER tandem
