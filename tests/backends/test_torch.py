"""PyTorch backend: the ONNX variants' output names, fp16 / bf16 on the CPU, any batch, hooks
on module paths, and what describe() reports."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.backends import TorchBackend
from harness.errors import UserError
from harness.align.tensor_diff import relative_l2 as rel_l2




def test_outputs_are_named_like_the_onnx_variants(fixture_model, fixture_onnx, fixture_batch):
    out = TorchBackend(fixture_model).infer(fixture_batch.inputs)
    raw = fixture_onnx(variant="raw").metadata["outputs"]
    decoded = fixture_onnx(variant="decoded").metadata["outputs"]
    assert list(out) == raw + decoded
    assert out["boxes"].shape == (4, 6300, 4) and out["scores"].shape == (4, 6300, 5)
    assert all(v.dtype == np.float32 for v in out.values())
    # the same numbers as the model source's own stages
    decoded_ref = fixture_model.decode(fixture_model.raw_outputs(fixture_batch.inputs))
    np.testing.assert_array_equal(out["boxes"], decoded_ref.boxes)


@pytest.mark.parametrize("precision, tol", [("fp16", 5e-3), ("bf16", 5e-2)])
def test_half_precisions_on_cpu(fixture_model, fixture_batch, precision, tol):
    fp32 = TorchBackend(fixture_model, outputs="raw").infer(fixture_batch.inputs[:2])
    backend = TorchBackend(fixture_model, precision=precision, outputs="raw")
    half = backend.infer(fixture_batch.inputs[:2])
    for name in fp32:
        assert half[name].dtype == np.float32
        assert 0 < rel_l2(half[name], fp32[name]) < tol, name
    # the caller's model is untouched: still fp32
    assert next(fixture_model.module.parameters()).dtype == torch.float32
    assert backend.describe()["precision"] == precision


def test_any_batch_size(fixture_model, fixture_batch):
    backend = TorchBackend(fixture_model, outputs="decoded")
    three = backend.infer(fixture_batch.inputs[:3])
    one = backend.infer(fixture_batch.inputs[2:3])
    assert three["boxes"].shape[0] == 3
    assert rel_l2(one["scores"], three["scores"][2:3]) < 1e-5


def test_intermediates_by_module_path(fixture_model, fixture_batch):
    backend = TorchBackend(fixture_model)
    names = backend.intermediate_names()
    assert "backbone.stem" in names and "bbox_head.head_module.convs_pred.0" in names
    got = backend.intermediates(fixture_batch.inputs[:1],
                                ["backbone.stem", "neck", "bbox_head.head_module.convs_pred.2"])
    assert got["backbone.stem"].shape == (1, 16, 160, 160)
    assert [k for k in got if k.startswith("neck.")] == ["neck.0", "neck.1", "neck.2"]
    raw = backend.infer(fixture_batch.inputs[:1])
    # YOLOv5HeadModule splits each prediction map as (anchor, [box 4, objectness, classes])
    pred = got["bbox_head.head_module.convs_pred.2"].reshape(1, 3, 10, 10, 10)
    np.testing.assert_array_equal(pred[:, :, 5:].reshape(1, 15, 10, 10), raw["cls_scores.2"])
    with pytest.raises(UserError, match="did you mean backbone.stem"):
        backend.intermediates(fixture_batch.inputs[:1], ["backbone.stem0"])


def test_describe(fixture_model):
    info = TorchBackend(fixture_model).describe()
    assert info["backend"] == "torch" and info["torch"] == torch.__version__
    assert info["device"] == "cpu" and info["precision"] == "fp32"
    assert info["mmyolo"] and info["use_tf32"] is None


def test_bad_options_and_inputs(fixture_model):
    with pytest.raises(UserError, match="precision"):
        TorchBackend(fixture_model, precision="fp8")
    with pytest.raises(UserError, match="float32"):
        TorchBackend(fixture_model).infer(np.zeros((1, 3, 320, 320), np.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and a CUDA "
                    "build of torch")
def test_cuda_matches_cpu_with_tf32_off(fixture_model, fixture_batch):
    cpu = TorchBackend(fixture_model, outputs="raw").infer(fixture_batch.inputs)
    backend = TorchBackend(fixture_model, device="cuda", outputs="raw", use_tf32=False)
    cuda = backend.infer(fixture_batch.inputs)
    assert backend.describe()["use_tf32"] is False
    for name in cpu:
        assert rel_l2(cuda[name], cpu[name]) < 1e-4, name


def test_intermediates_survive_in_place_ops(fixture_model, fixture_batch):
    """ConvModule runs SiLU(inplace=True) on its norm's output: a hook that kept the norm's
    tensor without copying it would return the activation instead (the RTMDet false alarm:
    Hardsigmoid(inplace=True) after the channel attention's fc)."""
    stem = fixture_model.module.backbone.stem
    assert getattr(stem.activate, "inplace", False), "test premise: an in-place activation"
    x = torch.from_numpy(fixture_batch.inputs[:1])
    with torch.no_grad():
        expected = stem.bn(stem.conv(x)).numpy()
    got = TorchBackend(fixture_model).intermediates(fixture_batch.inputs[:1],
                                                    ["backbone.stem.bn"])["backbone.stem.bn"]
    np.testing.assert_array_equal(got, expected)
