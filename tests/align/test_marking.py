"""The compare run's calls on an engine target's layer source (harness.align.compare
TargetRun): layer_backend builds chunked debug engines (fake TensorRT, tests/backends/
fake_tensorrt.py) with the NMS plugin's inputs apart, the candidates are read from their
engine, LayerDiff's own 64-layer chunks are served across the 32-layer engines with one engine
loaded at a time, and compare's marking figure is the largest drift of any engine."""
from __future__ import annotations

import math

import numpy as np
import pytest

from harness.align.layers import Layer, LayerDiff
from harness.align.targets import Target, layer_backend
from harness.backends import tensorrt_build, tensorrt_marking
from harness.backends.tensorrt_marking import NMS_INPUTS, relative_l2
from tests.backends.fake_tensorrt import (BOXES, SCORES, FakeDebugEngines, FakeDeployed,
                                          chain_onnx, layer_name, layer_tensor, tensor_value,
                                          use_fake_trt)

LAYERS = 70  # three engines of 32, 32 and 6 layers; LayerDiff asks 64 at a time


class Reference:
    """PyTorch's side: the same values the engines give, so every layer diff is zero."""

    def __init__(self, layers):
        self.tensor_of = {lay.module: lay.tensor for lay in layers}

    def intermediates(self, inputs, modules):
        return {m: tensor_value(self.tensor_of[m], inputs) for m in modules}


@pytest.fixture
def engine_target(monkeypatch, tmp_path):
    builds = use_fake_trt(monkeypatch)
    onnx_path = chain_onnx(tmp_path / "model.onnx", LAYERS, nms=True)
    tensorrt_build.build_engine(onnx_path, tmp_path / "model.engine", precision="fp16")
    builds.clear()
    deployed = FakeDeployed(tmp_path / "model.engine")
    target = Target(tmp_path / "model.engine", "engine", deployed, onnx_path=onnx_path,
                    precision="fp16")
    return target, builds


def test_compare_calls_on_chunked_debug_engines(engine_target, monkeypatch, tmp_path):
    target, builds = engine_target
    tensors = [layer_tensor(i) for i in range(LAYERS)]
    # engine 2 (layers 33-64) moves the final outputs most; the NMS-inputs engine a little
    opener = FakeDebugEngines({tensors[32]: 3e-2, BOXES: 1e-2})
    monkeypatch.setattr(tensorrt_marking, "open_debug_engine", opener)
    layers = [Layer(f"backbone.layer{i}", tensors[i], layer_name(i), i) for i in range(LAYERS)]
    plugin_nodes = ["/head/boxes/Relu", "/head/scores/Sigmoid"]  # compare's producers
    source = layer_backend(target, [lay.node for lay in layers] + plugin_nodes,
                           tmp_path / "work")
    assert source.chunk == 32 and [s.label for s in source.sets] == [
        "layers 1-32 of 70", "layers 33-64 of 70", "layers 65-70 of 70", NMS_INPUTS]
    assert builds == [tensors[:32], tensors[32:64], tensors[64:], [BOXES, SCORES]]
    assert opener.opened == []
    diff = LayerDiff(layers)
    reference = Reference(layers)
    marking = None
    rng = np.random.default_rng(0)
    for _ in range(2):
        x = rng.random((4, 3, 8, 8), dtype=np.float32)
        outputs = target.backend.infer(x)
        cands = source.intermediates(x, [BOXES, SCORES])  # PluginPipeline.candidates
        np.testing.assert_array_equal(cands[BOXES], tensor_value(BOXES, x))
        diff.add_batch(reference, source, x)
        if marking is None:  # TargetRun.add_batch, first batch
            marked = source.infer(x)
            marking = max(relative_l2(marked[k], v) for k, v in outputs.items()
                          if k in marked and np.issubdtype(v.dtype, np.floating))
    assert diff.skipped == {} and len(diff.stats) == LAYERS
    assert all(acc.summary()["rel_l2"] == 0 for acc in diff.stats.values())
    assert len(builds) == math.ceil(LAYERS / 32) + 1  # nothing built after the first pass
    assert opener.most_alive == 1 and len(opener.opened) == 2 * len(source.sets)
    assert marking == pytest.approx(3e-2, rel=1e-4)
    assert source.marking_changed_outputs_rel_l2 == pytest.approx(3e-2, rel=1e-4)


def test_layer_diff_off_builds_only_the_nms_inputs_engine(engine_target, monkeypatch,
                                                          tmp_path):
    target, builds = engine_target
    monkeypatch.setattr(tensorrt_marking, "open_debug_engine", FakeDebugEngines())
    source = layer_backend(target, ["/head/boxes/Relu", "/head/scores/Sigmoid"], tmp_path,
                           chunk=8)
    assert [s.label for s in source.sets] == [NMS_INPUTS] and builds == [[BOXES, SCORES]]


def test_onnx_target_is_its_own_layer_source(tmp_path):
    backend = object()
    target = Target(tmp_path / "m.onnx", "onnx", backend, onnx_path=tmp_path / "m.onnx")
    assert layer_backend(target, ["/a"], tmp_path) is backend
