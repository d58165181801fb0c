"""``vocdet serve``: a FastAPI detection service with micro-batching, health, metrics and limits."""

from vocdet.serve.app import create_app

__all__ = ["create_app"]
