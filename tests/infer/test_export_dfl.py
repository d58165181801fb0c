"""The export's DFL (``ExportDFL``) computes Ultralytics' ``DFL`` in ops ONNX Runtime runs fast: the same numbers."""

from __future__ import annotations

import torch
from ultralytics.nn.modules.block import DFL

from vocdet.infer.export import ExportDFL


def test_export_dfl_equals_ultralytics_dfl() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 64, 1029) * 4  # (batch, 4 sides x 16 bins, anchors); wide logits, as trained heads give
    theirs, ours = DFL(16)(x), ExportDFL(16)(x)
    assert ours.shape == theirs.shape == (2, 4, 1029)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert not torch.allclose(ExportDFL(16)(x.flip(1)), theirs)  # it depends on the bins' order, as DFL does
