"""How the loaders' worker processes start and what they do first.

Imported by the loaders' fork server before anything else (see :func:`worker_context`): keep it light.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.popen_forkserver
import multiprocessing.spawn
import os
import signal
from typing import Any

_SERVER_ENV = "VOCDET_LOADER_FORK_SERVER"

if os.environ.get(_SERVER_ENV) == "1":  # this process is the loaders' fork server (see worker_context)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def worker_init(worker_id: int) -> None:
    """Workers ignore SIGTERM and SIGINT: a scheduler signalling the whole process group (or Ctrl-C in a terminal)
    must not kill them under the trainer, which saves a checkpoint at the next batch and then shuts them down
    itself. (They still exit when the main process dies.) Lightning's per-worker seeding is kept."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.environ.get("PL_SEED_WORKERS") == "1":
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)


class _WorkerPopen(multiprocessing.popen_forkserver.Popen):
    """The standard fork-server start, except that the worker does not run the parent's ``__main__`` again (as a
    fork never did): the loaders send vocdet objects only, and a script that calls ``vocdet.train`` without an
    ``if __name__ == "__main__":`` guard keeps working."""

    def _launch(self, process_obj: Any) -> None:
        standard = multiprocessing.spawn.get_preparation_data

        def without_main(name: str) -> dict:
            data = standard(name)
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
            return data

        multiprocessing.spawn.get_preparation_data = without_main
        try:
            super()._launch(process_obj)
        finally:
            multiprocessing.spawn.get_preparation_data = standard


class _WorkerProcess(multiprocessing.context.ForkServerProcess):
    def run(self) -> None:
        # Stop signals stay blocked for the worker's whole life (it ignores them from the fork on, as its server
        # does): torch's worker loop installs its own SIGTERM handler before ``worker_init`` runs, and a
        # process-group SIGTERM landing in between killed the worker under the trainer.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        # The server exits when its trainer process does (the last writer of its "alive" pipe is gone), and the
        # worker then sees its parent change and exits. Each worker is handed a copy of that pipe for starting
        # processes of its own, which it never does: kept, it would hold the server, and so itself, alive forever
        # after a hard exit of the trainer (SIGKILL, the stop watchdog's os._exit).
        server = multiprocessing.forkserver._forkserver  # type: ignore[attr-defined]
        if server._forkserver_alive_fd is not None:
            os.close(server._forkserver_alive_fd)
            server._forkserver_alive_fd = None
        super().run()

    @staticmethod
    def _Popen(process_obj: Any) -> _WorkerPopen:
        return _WorkerPopen(process_obj)


class _WorkerContext(multiprocessing.context.ForkServerContext):
    Process = _WorkerProcess  # type: ignore[assignment]


def worker_context() -> multiprocessing.context.BaseContext | None:
    """Where loader workers start: a fork server (one single-threaded process per trainer process, started on first
    use), never a fork of the trainer itself.

    Forking a process that has threads is unsafe in CPython: a child forked while another thread held the
    interpreter's thread-list lock waits for it forever inside ``os.fork`` (CPython gh-112275, Python <= 3.12). A
    training process has threads by the time its loaders start (the validation loader's queue feeders, DDP,
    W&B), and a worker that never starts hangs the run: seen once in some hundred 2-rank starts. The fork server
    ignores SIGTERM, as the workers do (a scheduler signals the whole process group; they must outlive the
    checkpoint the trainer writes at the next batch), and exits when this process does. Datasets reach the workers
    pickled, so the image cache lives in shared memory (``VOCDataset(cache=True)``)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows: spawn, the only method there
        return None
    # This module first (the server ignores SIGTERM from then on), then torch, OpenCV and the augmentation, imported
    # once for all workers.
    multiprocessing.forkserver.set_forkserver_preload([__name__, "vocdet.data.dataset"])
    os.environ[_SERVER_ENV] = "1"  # inherited by the server only: it is started now if it is not running
    try:
        try:
            multiprocessing.forkserver.ensure_running()
        except ChildProcessError:  # forked from a process that had started one (Lightning's ddp_notebook)
            server = multiprocessing.forkserver._forkserver  # type: ignore[attr-defined]
            server._forkserver_pid = server._forkserver_address = server._forkserver_alive_fd = None
            multiprocessing.forkserver.ensure_running()
    finally:
        del os.environ[_SERVER_ENV]
    return _WorkerContext()
