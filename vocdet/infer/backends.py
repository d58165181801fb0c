"""The networks a :class:`~vocdet.infer.detector.Detector` runs: a PyTorch ``DetectionModel`` (from a checkpoint),
an ONNX Runtime session, a TorchScript module. Each takes a uint8 (B, 3, H, W) batch and returns the raw
(B, 4 + nc, anchors) output (or, for an ONNX graph with NMS, its (n, 7) rows).

Only the ONNX backend is torch-free; the other two import torch when built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vocdet.errors import VocdetError

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


class TorchBackend:
    """A vocdet/Ultralytics ``DetectionModel`` in eval mode: uint8 batch -> raw (B, 4 + nc, anchors)."""

    dynamic_shape = True
    nms_in_graph = False

    def __init__(self, net: Any, device: str, half: bool):
        import torch

        self.device = torch.device(device)
        self.dtype = torch.float16 if half else torch.float32
        self.net = net.to(self.device, self.dtype).eval()
        # NHWC weights: oneDNN (CPU) and tensor cores run convolutions without layout conversions.
        self.net.to(memory_format=torch.channels_last)

    def __call__(self, batch: np.ndarray) -> Any:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, non_blocking=True).to(self.dtype).div_(255)
            return self.net(x.contiguous(memory_format=torch.channels_last))[0].float()


class TorchScriptBackend:
    """A ``vocdet export --format torchscript`` module: float (B, 3, S, S) in 0..1 -> raw (B, 4 + nc, anchors)."""

    dynamic_shape = False
    nms_in_graph = False

    def __init__(self, net: Any, device: str):
        import torch

        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    def __call__(self, batch: np.ndarray) -> Any:
        import torch

        with torch.inference_mode():
            return self.net(torch.from_numpy(batch).to(self.device).float().div_(255).contiguous()).float()


def session_options(predict: Any = None, threads: int | None = None) -> Any:
    """ONNX Runtime ``SessionOptions`` from the ``predict.*`` keys (``threads``, ``ort_*``; absent keys: ONNX
    Runtime's defaults); ``threads`` overrides ``predict.threads``."""
    import onnxruntime as ort

    get = (lambda key, default: getattr(predict, key, default)) if predict is not None else (lambda _, d: d)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    threads = threads or get("threads", 0)
    if threads:
        options.intra_op_num_threads = int(threads)
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = {
        "all": level.ORT_ENABLE_ALL,
        "extended": level.ORT_ENABLE_EXTENDED,
        "basic": level.ORT_ENABLE_BASIC,
        "disable": level.ORT_DISABLE_ALL,
    }[get("ort_optimization", "all")]
    parallel = get("ort_execution_mode", "sequential") == "parallel"
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = bool(get("ort_mem_arena", True))
    options.enable_mem_pattern = bool(get("ort_mem_pattern", True))
    if not get("ort_prepacking", True):
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if get("ort_spinning", True) else "0")
    return options


class OnnxBackend:
    """An ONNX Runtime session on an exported vocdet model (CUDA provider when present)."""

    def __init__(
        self,
        path: Path,
        providers: Sequence[str] | None,
        nms_in_graph: bool,
        threads: int | None = None,
        predict: Any = None,
    ):
        import onnxruntime as ort

        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = session_options(predict, threads)
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.dynamic_shape = not all(isinstance(d, int) for d in inp.shape[2:])
        self.nms_in_graph = nms_in_graph

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        # numpy, not torch: waking torch's OpenMP threads here would compete with ONNX Runtime's for the cores.
        x = np.ascontiguousarray(batch, dtype=np.float32)
        x *= 1 / 255
        if self.fixed_batch and len(x) != self.fixed_batch:  # a batch-1 export: one image at a time
            outs = [self.session.run(None, {self.input_name: x[i : i + 1]})[0] for i in range(len(x))]
            if self.nms_in_graph:
                for i, o in enumerate(outs):
                    o[:, 0] = i
            return np.concatenate(outs)
        return self.session.run(None, {self.input_name: x})[0]


def check_device(device: str, half: bool) -> None:
    """A one-line error for a device this machine lacks, or half precision off CUDA."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise VocdetError(f"unknown device '{device}' (cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VocdetError(f"device '{device}' needs CUDA, which is not available here; use device=cpu")
    if half and dev.type != "cuda":
        raise VocdetError("half precision needs a CUDA device; drop half or use device=cuda")
