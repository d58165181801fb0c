"""Model files that are not what they claim: one-line errors from ``Detector.load``, never a raw exception."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("suffix", "make"),
    [
        (".onnx", "onnx_bad_json"),
        (".onnx", "onnx_empty_meta"),
        (".ckpt", "ckpt_without_config"),
    ],
)
def test_a_malformed_model_file_is_a_one_line_error(tmp_path: Path, suffix: str, make: str) -> None:
    """What an admin upload or `--onnx/--checkpoint` may hand over: broken metadata is a VocdetError (422 on upload),
    never a KeyError or JSONDecodeError (a 500)."""
    from vocdet.errors import VocdetError
    from vocdet.infer.detector import Detector

    path = tmp_path / f"m{suffix}"
    if make.startswith("onnx"):
        import onnx
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("Identity", ["images"], ["output0"])],
            "g",
            [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
            [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 3, 64, 64])],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        proto.metadata_props.add(key="vocdet", value="{not json" if make == "onnx_bad_json" else "{}")
        onnx.save(proto, str(path))
    else:
        import torch

        from vocdet.core.checkpoint import FORMAT_VERSION

        torch.save({"vocdet": {"format": FORMAT_VERSION}, "state_dict": {}}, path)
    with pytest.raises(VocdetError, match=r"export it again|incomplete vocdet checkpoint") as e:
        Detector.load(path)
    assert "\n" not in str(e.value)


def test_an_unknown_checkpoint_format_is_a_one_line_error(tmp_path: Path) -> None:
    import torch

    from vocdet.core.checkpoint import FORMAT_VERSION, load_checkpoint
    from vocdet.errors import VocdetError

    path = tmp_path / "future.ckpt"
    meta = {"format": FORMAT_VERSION + 1, "version": "9.9.9", "config": {"model": {"variant": "n"}}}
    torch.save({"vocdet": {**meta, "class_names": ["a"], "imgsz": 64}, "state_dict": {}}, path)
    with pytest.raises(VocdetError, match=rf"checkpoint format {FORMAT_VERSION + 1}.*reads format {FORMAT_VERSION}"):
        load_checkpoint(path)
    # a checkpoint written before the format key existed is format 1
    torch.save(
        {"vocdet": {"config": {"model": {"variant": "n"}}, "class_names": ["a"], "imgsz": 64}, "state_dict": {}}, path
    )
    assert load_checkpoint(path)["vocdet"].get("format") is None
