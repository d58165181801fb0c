"""Run the service with uvicorn: SIGTERM drains (in-flight requests finish, new ones get 503), then exits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vocdet.errors import VocdetError

log = logging.getLogger("vocdet.serve")


def check_model_file(path: Path) -> None:
    """Fail fast, before the server starts, on a model file that cannot be served."""
    if not path.is_file():
        raise VocdetError(f"model file not found: {path}")
    if path.suffix.lower() not in (".onnx", ".ckpt", ".torchscript"):
        raise VocdetError(f"cannot serve {path}: use a .onnx (vocdet export), .ckpt or .torchscript file")


def serve(cfg: DictConfig, models: dict[str, Path]) -> None:
    """Start uvicorn on ``serve.host:serve.port`` with ``models`` plus ``serve.models``; returns after shutdown."""
    import uvicorn

    from vocdet.serve.app import create_app

    for path in [*models.values(), *(Path(m["path"]) for m in cfg.serve.models)]:
        check_model_file(path)
    app = create_app(cfg, models)
    state = app.state.vocdet
    failure: dict[str, Any] = {}

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state.draining = True  # new requests get 503 while in-flight ones finish
            state.metrics.ready.set(0)
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after shutting down; a completed graceful shutdown exits 0 instead.
            self._captured_signals.clear()

    config = uvicorn.Config(
        app,
        host=cfg.serve.host,
        port=cfg.serve.port,
        log_level="info",
        timeout_graceful_shutdown=int(cfg.serve.graceful_timeout_s),
        access_log=False,
    )
    server = Server(config)

    def on_load_failure(message: str) -> None:
        failure["message"] = message
        server.should_exit = True

    state.on_load_failure = on_load_failure
    server.run()
    if failure:
        raise VocdetError(failure["message"])
    if not server.started:
        raise VocdetError(f"could not start the server on {cfg.serve.host}:{cfg.serve.port} (port in use?)")
