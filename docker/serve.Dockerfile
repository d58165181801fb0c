# vocdet serving image: slim, CPU, ONNX Runtime; serves /models/model.onnx on port 8000. Build from the repo root:
#   docker build -f docker/serve.Dockerfile -t vocdet-serve .
#   docker run -p 8000:8000 -v "$PWD/runs/quickstart/checkpoints/best.onnx:/models/model.onnx:ro" vocdet-serve
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    YOLO_OFFLINE=1 \
    YOLO_AUTOINSTALL=0

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY vocdet ./vocdet
COPY configs ./configs
# CPU-only torch from its own index (no CUDA libraries), then vocdet at the tested versions.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1 \
    && pip install -c constraints.txt .

RUN useradd --create-home --uid 1000 vocdet
USER 1000
ENV YOLO_CONFIG_DIR=/home/vocdet/.cache/vocdet/ultralytics

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["vocdet", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--onnx", "/models/model.onnx"]
