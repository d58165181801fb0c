# vocdet training image (CUDA). Build from the repository root:
#   docker build -f docker/train.Dockerfile -t vocdet-train .
# Run (data and runs mounted from the host; W&B offline unless WANDB_MODE/WANDB_API_KEY are passed in):
#   docker run --gpus all --shm-size 8g -v "$PWD/data:/app/data" -v "$PWD/runs:/app/runs" vocdet-train --gpus 2
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WANDB_MODE=offline \
    YOLO_OFFLINE=1 \
    YOLO_AUTOINSTALL=0

# OpenCV (pulled in by ultralytics) needs these shared libraries; tini is PID 1 (below).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY vocdet ./vocdet
COPY configs ./configs
# The base image's CUDA torch stays; everything else comes in at the versions pyproject.toml allows.
RUN pip install .

RUN useradd --create-home --uid 1000 vocdet && mkdir -p /app/data /app/runs && chown -R vocdet /app
USER 1000
ENV YOLO_CONFIG_DIR=/home/vocdet/.cache/vocdet/ultralytics

# tini as PID 1: it reaps zombies, and a SIGTERM from the runtime reaches vocdet (and, with -g, its DDP ranks and
# loader workers) even in the instant before vocdet installs its own handler; as PID 1 vocdet would ignore it.
ENTRYPOINT ["tini", "-g", "--", "vocdet", "train"]
CMD []
