"""Layer groups: on the fixture's exported graph (the module paths of YOLOv5-n's backbone
stages, neck blocks and head branches, every Conv in exactly one group, each group's scope
prefix naming exactly its nodes), and on planted module trees (containers looked through,
single-child chains followed, a module with an op of its own left whole, auto's choice)."""
from __future__ import annotations

import pytest

from harness.errors import UserError
from harness.export.quantize import QUANTIZED_OPS
from harness.sensitivity.groups import common_scope, derive_groups, model_modules

STAGES = [
    "backbone.stem", "backbone.stage1", "backbone.stage2", "backbone.stage3", "backbone.stage4",
    "neck.reduce_layers.2", "neck.top_down_layers.0", "neck.top_down_layers.1",
    "neck.downsample_layers.0", "neck.bottom_up_layers.0", "neck.downsample_layers.1",
    "neck.bottom_up_layers.1", "bbox_head.head_module.convs_pred.0",
    "bbox_head.head_module.convs_pred.1", "bbox_head.head_module.convs_pred.2"]


@pytest.fixture(scope="module")
def fixture_graph(fixture_model, fixture_onnx):
    import onnx

    graph = onnx.load(str(fixture_onnx(variant="raw").path)).graph
    return model_modules(fixture_model.module), [(n.name, n.op_type) for n in graph.node]


def test_fixture_stage_groups(fixture_graph):
    modules, nodes = fixture_graph
    level, groups = derive_groups(modules, nodes, QUANTIZED_OPS, "stage")
    assert level == "stage" and [g.name for g in groups] == STAGES
    convs = [name for name, op in nodes if op == "Conv"]
    assert len(convs) == 60
    owned = [n for g in groups for n in g.quantized]
    assert sorted(owned) == sorted(convs)  # every Conv in exactly one group
    by_name = {g.name: g for g in groups}
    assert by_name["backbone.stage1"].prefix == "/backbone/stage1/"
    assert by_name["neck.reduce_layers.2"].prefix == "/neck/reduce_layers.2/"
    assert by_name["bbox_head.head_module.convs_pred.2"].nodes == (
        "/bbox_head/head_module/convs_pred.2/Conv",)
    assert by_name["backbone.stage3"].kind == "Sequential"
    assert len(by_name["backbone.stage3"].quantized) == 10
    names = [name for name, _ in nodes]
    for g in groups:  # the TensorRT prefix selects the group's nodes and no other
        assert [n for n in names if n.startswith(g.prefix)] == list(g.nodes), g.name


def test_fixture_module_groups_refine_the_stages(fixture_graph):
    modules, nodes = fixture_graph
    _, stages = derive_groups(modules, nodes, QUANTIZED_OPS, "stage")
    level, groups = derive_groups(modules, nodes, QUANTIZED_OPS, "module")
    assert level == "module" and len(groups) == 30
    names = [g.name for g in groups]
    assert "backbone.stage1.0" in names and "backbone.stage4.2" in names
    # a ConvModule is not split into its conv: its activation stays with it
    assert "backbone.stem" in names and "backbone.stem.conv" not in names
    for g in groups:
        parents = [s for s in stages if g.name == s.name or g.name.startswith(s.name + ".")]
        assert len(parents) == 1 and set(g.nodes) <= set(parents[0].nodes), g.name
    assert sum(len(g.quantized) for g in groups) == 60
    # auto: the stage level has 15 groups, within 6-20
    assert derive_groups(modules, nodes, QUANTIZED_OPS, "auto")[0] == "stage"


# a planted model: a backbone with a ModuleList of two blocks, a neck with one child chain
# down to two convs, a head holding one functional conv of its own besides a child conv
PLANTED = {
    "": "Detector", "backbone": "Backbone", "backbone.blocks": "ModuleList",
    "backbone.blocks.0": "Block", "backbone.blocks.0.conv": "Conv2d",
    "backbone.blocks.1": "Block", "backbone.blocks.1.conv": "Conv2d",
    "neck": "Neck", "neck.only": "Wrapper", "neck.only.a": "ConvModule",
    "neck.only.a.conv": "Conv2d", "neck.only.b": "ConvModule", "neck.only.b.conv": "Conv2d",
    "head": "Head", "head.cls": "Conv2d", "head.act": "SiLU",
}
PLANTED_NODES = [
    ("/backbone/blocks.0/conv/Conv", "Conv"), ("/backbone/blocks.0/Relu", "Relu"),
    ("/backbone/blocks.1/conv/Conv", "Conv"), ("/neck/only/a/conv/Conv", "Conv"),
    ("/neck/only/b/conv/Conv", "Conv"), ("/neck/Concat", "Concat"),
    ("/head/cls/Conv", "Conv"), ("/head/Conv", "Conv"), ("/head/act/Sigmoid", "Sigmoid"),
    ("Constant_7", "Constant"),
]


def test_planted_tree():
    level, groups = derive_groups(PLANTED, PLANTED_NODES, ["Conv"], "stage")
    assert [g.name for g in groups] == ["backbone.blocks.0", "backbone.blocks.1",
                                        "neck.only.a", "neck.only.b", "head"]
    head = groups[-1]
    assert head.quantized == ("/head/cls/Conv", "/head/Conv")  # its own conv kept with it
    assert head.nodes == ("/head/cls/Conv", "/head/Conv", "/head/act/Sigmoid")
    assert groups[0].nodes == ("/backbone/blocks.0/conv/Conv", "/backbone/blocks.0/Relu")
    # module level: nothing left to split, the same groups
    assert [g.name for g in derive_groups(PLANTED, PLANTED_NODES, ["Conv"], "module")[1]] \
        == [g.name for g in groups]
    # auto: fewer than 6 groups at every level: the finest it reached
    assert len(derive_groups(PLANTED, PLANTED_NODES, ["Conv"], "auto")[1]) == 5


def test_no_quantized_op_in_any_module_is_one_line():
    with pytest.raises(UserError, match="no quantized operator"):
        derive_groups({"": "M", "backbone": "B"}, [("/x/Relu", "Relu")], ["Conv"], "stage")
    with pytest.raises(UserError, match="unknown --groups 'layers'"):
        derive_groups(PLANTED, PLANTED_NODES, ["Conv"], "layers")


def test_common_scope():
    assert common_scope(["/a/b/c/Conv", "/a/b/Relu"]) == "/a/b/"
    assert common_scope(["/a/x/Conv", "/b/Relu"]) == ""
    assert common_scope(["/a/b.1/Conv"]) == "/a/b.1/"
