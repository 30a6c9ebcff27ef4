# GPU image: MoCo training (`moco-train`) and the retrieval server (`retrieval-server`).
#
#   docker build -t moco-retrieval .
#   docker run --gpus all --ipc=host -v "$PWD/data:/data" -v "$PWD/runs:/runs" moco-retrieval \
#       moco-train train /data/train --run-dir /runs/r1          # --ipc=host: data-loader shared memory
#   docker run ... moco-retrieval torchrun --nproc_per_node 8 -m moco_train train ...   # 8 GPUs
#   docker run --gpus all -p 50051:50051 -p 9100:9100 -v "$PWD/runs:/runs" -v store:/store \
#       -e RETRIEVAL_MODEL=/runs/r1/encoder.pt moco-retrieval          # serves (the default CMD)
#
# torch/torchvision come from requirements.txt unchanged: their PyPI wheels for Linux x86_64 are
# the CUDA builds. faiss-cpu is swapped for the FAISS GPU wheel (same Python API; the server calls
# faiss.get_num_gpus() at start and puts the index on the GPUs when there are any).
# tests/test_docker.py lints this file and runs its Python install steps on the CPU.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ARG FAISS_GPU_REQUIREMENT="faiss-gpu-cu12==1.14.1.post1"
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu's python3 (3.12) in a virtualenv; the distribution's packages are not pinned on purpose:
# security updates of the base image's release are wanted. gcc, libc6-dev and python3-dev are for
# `moco-train train --compile` (Triton builds its kernel launchers with them; without a C compiler
# --compile auto stays eager).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /opt/moco-retrieval

# Dependencies first (a layer that survives code changes): requirements.txt without faiss-cpu,
# plus the FAISS GPU wheel.
COPY requirements.txt ./
RUN grep -v '^faiss-cpu' requirements.txt > requirements-gpu.txt \
    && pip install --no-cache-dir -r requirements-gpu.txt "$FAISS_GPU_REQUIREMENT"

# The project itself, without its declared dependencies (which name faiss-cpu).
COPY pyproject.toml README.md ./
COPY moco_retrieval/ moco_retrieval/
COPY moco_train/ moco_train/
COPY retrieval_server/ retrieval_server/
COPY clients/ clients/
RUN pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 10001 --user-group moco \
    && mkdir -p /data /runs /store \
    && chown moco:moco /data /runs /store

USER 10001:10001
WORKDIR /home/moco
VOLUME ["/data", "/runs", "/store"]

# gRPC and Prometheus metrics. Every server flag can also be set as RETRIEVAL_<FLAG>.
ENV RETRIEVAL_HOST=0.0.0.0 \
    RETRIEVAL_PORT=50051 \
    RETRIEVAL_METRICS_PORT=9100 \
    RETRIEVAL_STORE=/store \
    RETRIEVAL_MODEL=/runs/encoder.pt
EXPOSE 50051 9100

# grpc.health.v1 on the serving port: healthy once the model and the index are loaded.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "retrieval_server.healthcheck"]

CMD ["retrieval-server", "serve"]
