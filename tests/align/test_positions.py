"""Layer mapping by graph position (harness.align.positions) where a graph's names are gone:
on every family, a graph with its node names blanked or renamed (`Conv_12`) maps every layer
the names mapped, to the very same tensors; an alignment the remaining names contradict is
refused with its reason; end to end the report counts layers mapped by position."""
from __future__ import annotations

import onnx
import pytest

from harness.align.layers import layers_for
from harness.models.zoo import SHIPPED_CONFIGS, shipped_config


def _renamed(proto, how: str):
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for i, n in enumerate(out.graph.node):
        n.name = "" if how == "blank" else f"{n.op_type}_{i}"
    return out


def _by_name(model, proto):
    found = layers_for(model, proto.graph)
    assert found.counts["name"] == len(found.layers) and found.counts["position"] == 0
    return {lay.module: lay.tensor for lay in found.layers}, found


@pytest.fixture(scope="module")
def family_graph(tmp_path_factory):
    from harness.export.onnx_export import ExportSettings, export_onnx
    from harness.models.mmyolo import load_mmyolo_model

    made = {}

    def get(family):
        if family not in made:
            model = load_mmyolo_model(shipped_config(family), seed=0)
            path = tmp_path_factory.mktemp(family) / "raw.onnx"
            export_onnx(model, path, ExportSettings())
            made[family] = (model, onnx.load(str(path)))
        return made[family]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("family", list(SHIPPED_CONFIGS))
def test_every_family_maps_by_position_to_the_tensors_names_give(family, family_graph):
    model, proto = family_graph(family)
    named, _ = _by_name(model, proto)
    found = layers_for(model, _renamed(proto, "blank").graph)
    by_position = {lay.module: lay.tensor for lay in found.layers}
    assert found.counts["position"] == len(named) and not found.unmapped, found.position_note
    assert by_position == named
    # graph order (depth) is the names' order too
    assert [lay.module for lay in found.layers] == list(named)


def test_renamed_nodes_map_by_position(fixture_model, fixture_onnx):
    proto = onnx.load(str(fixture_onnx(variant="raw").path))
    named, _ = _by_name(fixture_model, proto)
    found = layers_for(fixture_model, _renamed(proto, "renamed").graph)
    assert found.counts["position"] == len(named) == 60
    assert {lay.module: lay.tensor for lay in found.layers} == named
    assert {lay.module: lay.node for lay in found.layers}["backbone.stem"].startswith("Mul_")


def test_names_that_contradict_the_alignment_refuse_it(fixture_model, fixture_onnx):
    """Half the names stripped, and two backbone convs of one signature swapped by name:
    the names left put a module on a Conv the alignment does not — position is not trusted."""
    proto = onnx.load(str(fixture_onnx(variant="raw").path))
    for n in proto.graph.node:
        n.name = n.name if "/backbone/" in n.name else ""
    convs = [n for n in proto.graph.node if n.op_type == "Conv" and "/backbone/" in n.name]
    sig = {}
    inits = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    pair = None
    for n in convs:
        key = inits[n.input[1]]
        if key in sig:
            pair = (sig[key], n)
            break
        sig[key] = n
    assert pair, "the fixture's backbone has two convs of one signature"
    pair[0].name, pair[1].name = pair[1].name, pair[0].name
    found = layers_for(fixture_model, proto.graph)
    assert found.counts["position"] == 0 and found.unmapped
    assert "not trusted" in found.position_note


@pytest.mark.slow
def test_compare_reports_layers_mapped_by_position(tmp_path, fixture_model, fixture_onnx,
                                                   varied_images):
    from harness.align.compare import run_compare
    from harness.align.session import open_or_say_why

    path = tmp_path / "no_names.onnx"
    onnx.save(_renamed(onnx.load(str(fixture_onnx(variant="raw").path)), "blank"), str(path))
    doc = run_compare(fixture_model, [open_or_say_why(path, "cpu")], varied_images[:2],
                      progress=False).to_json()
    (t,) = doc["targets"]
    layers = t["layers"]
    assert layers["mapped"]["position"] == 60 and layers["mapped"]["not mapped"] == 0
    assert len(layers["rows"]) == 60 and max(r["rel_l2"] for r in layers["rows"]) < 1e-4
    assert "matches PyTorch" in doc["verdict"]
