# vocdet serving image: slim, CPU, ONNX Runtime; serves /models/model.onnx on port 8000. Build from the repo root:
#   docker build -f docker/serve.Dockerfile -t vocdet-serve .
#   docker run -p 8000:8000 -v "$PWD/runs/quickstart/checkpoints/best.onnx:/models/model.onnx:ro" vocdet-serve
# ONNX only: no torch, Lightning, Ultralytics or W&B in the image (serve --checkpoint needs the full package).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 1000 vocdet
WORKDIR /app
# The serving runtime at the tested versions (opencv-python-headless: no libGL, so no apt packages), then vocdet
# itself without its training dependencies. tests/serve/test_serve_venv.py builds a venv the same way.
COPY constraints.txt ./
COPY docker/serve-requirements.txt ./docker/
RUN pip install -c constraints.txt -r docker/serve-requirements.txt
COPY pyproject.toml README.md ./
COPY vocdet ./vocdet
COPY configs ./configs
RUN pip install --no-deps .

USER 1000

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["vocdet", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--onnx", "/models/model.onnx"]
