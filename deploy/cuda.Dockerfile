# syntax=docker/dockerfile:1
# The CUDA variant of ../Dockerfile (same layout, user, ports, probes and entry point): torch's
# CUDA wheel and llama.cpp built with CUDA. Build from the repository root:
#   docker build -f deploy/cuda.Dockerfile -t tandem:cuda .
#   docker run --gpus all ... tandem:cuda cloud serve --config /srv/tandem/worker.yaml ...
# The host needs the NVIDIA driver (>= the CUDA version below) and the NVIDIA Container
# Toolkit. Pick CUDA_VERSION and TORCH_INDEX to match each other and the driver.
# No constraints files: constraints/ pins torch to its CPU wheel.

ARG CUDA_VERSION=12.8.1

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
    build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG EXTRAS=llm,otel,gpu
# The GPU generations to compile llama.cpp's kernels for (A100, A10/30xx, L4/40xx, H100).
ARG CUDA_ARCHITECTURES="80;86;89;90"
WORKDIR /src
RUN pip install --index-url "$TORCH_INDEX" "torch==2.13.*"
# Linked against the driver's stub here; the real libcuda comes from the host at run time.
RUN CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHITECTURES" \
    LIBRARY_PATH=/usr/local/cuda/lib64/stubs CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    pip install "llama-cpp-python[server]>=0.3.16"
COPY pyproject.toml README.md ./
COPY tandem/ tandem/
COPY runtime/ runtime/
COPY kernels/ kernels/
COPY router/ router/
COPY edge/ edge/
COPY cloud/ cloud/
COPY bench/ bench/
COPY reference/ reference/
RUN pip install ".[$EXTRAS]" && tandem --help > /dev/null

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /home/tandem --create-home tandem
COPY --from=builder /opt/venv /opt/venv
WORKDIR /srv/tandem
COPY deploy/worker.yaml deploy/gateway-policy.yaml /srv/tandem/
COPY deploy/healthcheck.py /usr/local/bin/tandem-healthcheck
RUN mkdir -p /srv/tandem/models /srv/tandem/state \
 && chown tandem:tandem /srv/tandem/state \
 && chmod 0755 /usr/local/bin/tandem-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TANDEM_CACHE_DIR=/home/tandem/.cache/tandem \
    TANDEM_HTTP_PORT=9100 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TQDM_DISABLE=1
USER tandem
VOLUME ["/srv/tandem/state"]
EXPOSE 5555 9100 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["tandem-healthcheck"]
ENTRYPOINT ["tandem"]
CMD ["cloud", "serve", "--config", "/srv/tandem/worker.yaml", "--log-format", "json"]
