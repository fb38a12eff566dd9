"""Module path ↔ ONNX tensor mapping, the accumulated layer metrics, first divergence."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from harness.align.layers import (
    DIVERGENCE, TOLERANCES, LayerDiff, map_modules, module_path_of, summarize_layers,
)
from harness.align.tensor_diff import DiffAccumulator, relative_l2


@pytest.mark.parametrize("node, path", [
    ("/backbone/stem/conv/Conv", "backbone.stem.conv"),
    ("/backbone/stage1/stage1.0/conv/Conv", "backbone.stage1.0.conv"),
    ("/backbone/stage1/stage1.1/blocks/blocks.0/conv1/activate/Mul",
     "backbone.stage1.1.blocks.0.conv1.activate"),
    ("/neck/reduce_layers.2/conv/Conv", "neck.reduce_layers.2.conv"),
    ("/Concat", ""),
])
def test_module_path_of_node_names(node, path):
    assert module_path_of(node) == path


def _node(name, op="Conv", out=None):
    return helper.make_node(op, ["x"], [out or name + "_output_0"], name=name)


def test_map_modules_takes_the_last_node_of_each_scope_in_graph_order():
    nodes = [
        _node("/backbone/stem/conv/Conv"),
        _node("/backbone/stem/activate/Sigmoid", "Sigmoid"),
        _node("/backbone/stem/activate/Mul", "Mul"),
        # quantisation wrappers carry the scope's name but never its output
        _node("/backbone/stem/activate/Mul_output_0_QuantizeLinear", "QuantizeLinear"),
        _node("/backbone/stem/activate/Mul_output_0_DequantizeLinear", "DequantizeLinear"),
        _node("/neck/reduce_layers.0/conv/Conv"),
        _node("/bbox_head/head_module/convs_pred.0/Conv"),
    ]
    layers, unmapped, _ = map_modules(nodes, ["bbox_head.head_module.convs_pred.0",
                                           "backbone.stem", "neck.reduce_layers.0",
                                           "neck.missing"])
    assert [(lay.module, lay.tensor, lay.depth) for lay in layers] == [
        ("backbone.stem", "/backbone/stem/activate/Mul_output_0", 0),
        ("neck.reduce_layers.0", "/neck/reduce_layers.0/conv/Conv_output_0", 1),
        ("bbox_head.head_module.convs_pred.0",
         "/bbox_head/head_module/convs_pred.0/Conv_output_0", 2)]
    assert layers[0].node == "/backbone/stem/activate/Mul"
    assert unmapped == ["neck.missing"]


def test_accumulator_over_batches_equals_one_computation():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(6, 8, 5, 5)).astype(np.float32)
    tgt = ref + rng.normal(scale=1e-3, size=ref.shape).astype(np.float32)
    acc = DiffAccumulator()
    for i in range(0, 6, 4):
        acc.add(tgt[i:i + 4], ref[i:i + 4])
    s = acc.summary()
    d = tgt.astype(np.float64) - ref
    assert s["max_abs"] == pytest.approx(np.abs(d).max())
    assert s["mean_abs"] == pytest.approx(np.abs(d).mean())
    assert s["rel_l2"] == pytest.approx(relative_l2(tgt, ref), rel=1e-9)
    cos = float((tgt.ravel().astype(np.float64) @ ref.ravel()) /
                (np.linalg.norm(tgt.astype(np.float64)) * np.linalg.norm(ref.astype(np.float64))))
    assert s["cosine"] == pytest.approx(cos, rel=1e-12)
    assert s["nonfinite"] == 0


def test_accumulator_counts_nonfinite_and_zero_reference():
    acc = DiffAccumulator()
    acc.add(np.array([np.nan, 0.0, 1.0]), np.zeros(3))
    s = acc.summary()
    assert s["nonfinite"] == 1 and s["rel_l2"] == 1.0 and s["cosine"] == 0.0


def _rows(errors, nonfinite=()):
    from harness.results import LayerRow

    return [LayerRow(module=f"m{i}", tensor=f"t{i}", node=f"n{i}", depth=i, shape=[1],
                     max_abs=e, mean_abs=e, rel_l2=e, cosine=1.0,
                     nonfinite=int(i in nonfinite), nonfinite_target=int(i in nonfinite))
            for i, e in enumerate(errors)]


def test_first_divergence_and_first_past_tolerance():
    doc = summarize_layers(_rows([1e-7, 5e-4, 2e-3, 3e-2, 1e-3]), "fp16")
    assert doc.tolerance == TOLERANCES["fp16"]
    assert doc.first_divergence.module == "m1"
    assert doc.first_divergence.tolerance == DIVERGENCE
    assert doc.first_past_tolerance.module == "m3"
    assert [w["module"] for w in doc.worst[:2]] == ["m3", "m2"]
    clean = summarize_layers(_rows([1e-7, 2e-6]), "fp32")
    assert clean.first_divergence is None and clean.first_past_tolerance is None


def test_a_layer_with_inf_is_its_own_divergence_point_not_a_tolerance_pass():
    """Metrics cover the finite elements only: a layer with inf must not read as "within
    tolerance" — it is named as the first non-finite layer, apart from the rel-L2 lines."""
    doc = summarize_layers(_rows([1e-7, 6e-4, 2e-3], nonfinite={1, 2}), "fp16")
    assert doc.first_past_tolerance is None  # 6e-4 and 2e-3 < 1e-2 on their finite parts
    assert doc.first_nonfinite.module == "m1" and doc.first_nonfinite.target == 1
    assert doc.layers_with_nonfinite == 2


class _Fixed:
    """A backend whose intermediates are given arrays, counting how many names each call
    asked for (the chunking)."""

    def __init__(self, values):
        self.values = values
        self.calls = []

    def intermediates(self, inputs, names):
        self.calls.append(len(names))
        return {n: self.values[n] for n in names if n in self.values}


def test_layer_diff_chunks_and_skips_shape_mismatches():
    from harness.align.layers import Layer

    layers = [Layer(f"m{i}", f"t{i}", f"n{i}", i) for i in range(5)]
    ref = _Fixed({f"m{i}": np.ones((2, 3)) for i in range(5)})
    vals = {f"t{i}": np.ones((2, 3)) * (1 + i * 1e-3) for i in range(4)}
    vals["t3"] = np.ones((2, 4))  # wrong shape
    tgt = _Fixed(vals)  # t4 missing
    diff = LayerDiff(layers, chunk=2)
    diff.add_batch(ref, tgt, np.zeros((2, 3, 8, 8), np.float32))
    assert ref.calls == [2, 2, 1]
    doc = diff.result("fp32")
    assert [r.module for r in doc.rows] == ["m0", "m1", "m2"]
    assert "shapes differ" in doc.skipped["m3"] and "no tensor t4" in doc.skipped["m4"]
    assert doc.rows[2].rel_l2 == pytest.approx(2e-3)
    # a second batch asks only for the layers still compared
    diff.add_batch(ref, tgt, np.zeros((2, 3, 8, 8), np.float32))
    assert ref.calls[3:] == [2, 1]


def test_convmodule_parts_are_compared_as_their_convmodule(fixture_model, fixture_onnx):
    """`--layers 'neck.*'` picks a ConvModule's bare conv too; the exporter folds its
    BatchNorm into that conv, so comparing the two was a false alarm (rel-L2 ~0.5): the part
    is replaced by its ConvModule and the report says so."""
    import onnx

    from harness.align.layers import layers_for

    graph = onnx.load(str(fixture_onnx(variant="raw").path)).graph
    found = layers_for(fixture_model, graph, ["neck.reduce_layers.2*"])
    layers, unmapped, replaced = found.layers, found.unmapped, found.replaced
    assert replaced == {"neck.reduce_layers.2.conv": "neck.reduce_layers.2",
                        "neck.reduce_layers.2.bn": "neck.reduce_layers.2",
                        "neck.reduce_layers.2.activate": "neck.reduce_layers.2"}
    assert [lay.module for lay in layers] == ["neck.reduce_layers.2"] and not unmapped
