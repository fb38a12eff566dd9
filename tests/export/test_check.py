"""`harness check`: TensorRT pre-flight on the CPU. Small graphs built here plant one fault each
(a TopK of K 30000, NonZero, INT64 weights, an operator the parser lacks, plugin nodes, a graph
onnx.checker rejects); every file `harness export` writes passes onnx.checker's full check;
`harness export` reports the findings and `harness build` refuses an error before building."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from harness.cli import main
from harness.errors import UserError
from harness.export.check import check_file, check_model, operator_table, resolve_version
from harness.export.metadata import write_metadata

TOPK_NAME = "/bbox_head/head_module/TopK"


def model_of(nodes, inputs, outputs, inits=(), opset=17, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=imports)


def output(name, dtype=TensorProto.FLOAT, rank=2):
    """A graph output of symbolic shape (onnx.checker wants a shape on every output)."""
    return helper.make_tensor_value_info(name, dtype, [f"{name}{i}" for i in range(rank)])


def scores_input(dims=(1, 33600)):
    return helper.make_tensor_value_info("scores", TensorProto.FLOAT, list(dims))


def topk_model(k_nodes, k_inits=(), dims=(1, 33600), sorted_=1):
    """scores (1, N) → TopK(K from `k_nodes` / `k_inits`, output "k") → values, indices;
    N = 33600 anchors: a 1280 x 1280 input at strides 8, 16, 32."""
    nodes = list(k_nodes) + [helper.make_node("TopK", ["scores", "k"], ["values", "indices"],
                                              name=TOPK_NAME, axis=1, sorted=sorted_)]
    outs = [output("values"), output("indices", TensorProto.INT64)]
    return model_of(nodes, [scores_input(dims)], outs, k_inits)


def k_initializer(k):
    return [numpy_helper.from_array(np.array([k], np.int64), "k")]


def codes(findings, severity=None):
    return [f.code for f in findings if severity is None or f.severity == severity]


def one(findings, code):
    """The one finding of kind `code`; the graphs here are otherwise valid ONNX."""
    if code != "onnx-checker":
        assert "onnx-checker" not in codes(findings), findings
    found = [f for f in findings if f.code == code]
    assert len(found) == 1, findings
    return found[0]


# -- TopK

def test_topk_of_30000_is_an_error_naming_node_module_and_k():
    f = one(check_model(topk_model([], k_initializer(30000))), "topk-k-over-limit")
    assert f.severity == "error" and f.node == TOPK_NAME
    assert f.module == "bbox_head.head_module"
    assert "K = 30000" in f.message and "3840" in f.message and "build fails" in f.message


def test_topk_of_1000_passes():
    findings = check_model(topk_model([], k_initializer(1000)))
    assert not [f for f in findings if f.code.startswith("topk")], findings


def test_k_from_a_constant_chain_is_resolved():
    const = helper.make_node("Constant", [], ["k0"], value=helper.make_tensor(
        "v", TensorProto.INT64, [], [30000]))
    shape = numpy_helper.from_array(np.array([1], np.int64), "one")
    chain = [const, helper.make_node("Reshape", ["k0", "one"], ["k1"]),
             helper.make_node("Cast", ["k1"], ["k"], to=TensorProto.INT64)]
    f = one(check_model(topk_model(chain, [shape])), "topk-k-over-limit")
    assert "K = 30000" in f.message


def min_of_constant_and_anchors(nms_pre):
    """K = min(nms_pre, scores.shape[1]): how mmdet-style heads cap nms_pre."""
    return [helper.make_node("Constant", [], ["pre"], value=helper.make_tensor(
                "v", TensorProto.INT64, [1], [nms_pre])),
            helper.make_node("Shape", ["scores"], ["shape"]),
            helper.make_node("Constant", [], ["i1"], value=helper.make_tensor(
                "i", TensorProto.INT64, [], [1])),
            helper.make_node("Gather", ["shape", "i1"], ["anchors"], axis=0),
            helper.make_node("Unsqueeze", ["anchors", "axes"], ["anchors1"]),
            helper.make_node("Min", ["pre", "anchors1"], ["k"])], \
        [numpy_helper.from_array(np.array([0], np.int64), "axes")]


@pytest.mark.parametrize("anchors, expect", [(8400, "error"), (2100, None), ("n", "warning")])
def test_k_from_min_of_constant_and_a_shape_gather(anchors, expect):
    nodes, inits = min_of_constant_and_anchors(30000)
    findings = check_model(topk_model(nodes, inits, dims=("batch", anchors)))
    topk = [f for f in findings if f.code.startswith("topk")]
    if expect is None:  # min(30000, 2100): K 2100 is known and within the limit
        assert topk == []
    elif expect == "error":
        assert topk[0].code == "topk-k-over-limit" and "K = 8400" in topk[0].message
    else:  # anchors unknown until run time: K is at most 30000
        assert topk[0].code == "topk-k-data-dependent" and topk[0].severity == "warning"
        assert "at most 30000" in topk[0].message


def test_k_from_data_is_its_own_finding():
    model = topk_model([helper.make_node("ReduceMax", ["kin"], ["k"], keepdims=1)])
    model.graph.input.append(helper.make_tensor_value_info("kin", TensorProto.INT64, [1]))
    f = one(check_model(model), "topk-k-data-dependent")
    assert f.severity == "warning" and "run time" in f.message


def test_the_config_value_behind_k_is_named():
    model = topk_model([], k_initializer(30000))
    write_metadata(model, {"model": {"test_cfg": {"nms_pre": 30000, "max_per_img": 300}}})
    assert "from model.test_cfg.nms_pre = 30000" in \
        one(check_model(model), "topk-k-over-limit").message
    named = check_model(topk_model([], k_initializer(30000)),
                        config_values={"model.test_cfg.nms_pre": 30000})
    assert "model.test_cfg.nms_pre = 30000" in one(named, "topk-k-over-limit").message


def test_unsorted_topk_is_refused_where_the_list_says_so():
    model = topk_model([], k_initializer(100), sorted_=0)
    assert one(check_model(model, "10"), "topk-unsorted").severity == "error"
    assert "topk-unsorted" not in codes(check_model(model, "8.6"))


# -- data-dependent shapes, operators, INT64

def test_nonzero_and_nms_have_data_dependent_outputs():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    idx = output("idx", TensorProto.INT64)
    f = one(check_model(model_of([helper.make_node("NonZero", ["x"], ["idx"], name="/nz")],
                                 [x], [idx])), "data-dependent-shape")
    assert f.severity == "info" and f.op == "NonZero" and "8.5" in f.message
    boxes = helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 10, 4])
    scores = helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 2, 10])
    nms = helper.make_node("NonMaxSuppression", ["boxes", "s"], ["sel"], name="/nms")
    f = one(check_model(model_of([nms], [boxes, scores],
                                 [output("sel", TensorProto.INT64)])),
            "data-dependent-shape")
    assert f.severity == "warning" and "INMSLayer" in f.message


@pytest.mark.parametrize("op", ["Det", "Unique"])
def test_operators_the_parser_lacks_are_errors(op):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])
    y = output("y", rank=1)
    f = one(check_model(model_of([helper.make_node(op, ["x"], ["y"], name=f"/{op}")], [x], [y])),
            "unsupported-op")
    assert f.severity == "error" and f.op == op and "release/10.1-GA" in f.message


def test_int64_weights_warn_before_tensorrt_9_only():
    model = topk_model([], k_initializer(100))
    f86 = one(check_model(model, "8.6"), "int64")
    assert f86.severity == "warning" and "k" in f86.message and "INT32" in f86.message
    assert one(check_model(model, "10"), "int64").severity == "info"


# -- plugins

def plugin_model(op, domain, **attrs):
    boxes = helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 10, 1, 4])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 10, 2])
    outs = ["num", "dets"]
    node = helper.make_node(op, ["boxes", "scores"], outs, name=f"/{op}", domain=domain,
                            **attrs)
    return model_of([node], [boxes, scores],
                    [output(o) for o in outs],
                    domains=[domain])


BATCHED = dict(shareLocation=1, backgroundLabelId=-1, numClasses=2, topK=1000, keepTopK=100,
               scoreThreshold=0.1, iouThreshold=0.5)
EFFICIENT = dict(score_threshold=0.1, iou_threshold=0.5, max_output_boxes=100,
                 background_class=-1, score_activation=0, box_coding=0)


def test_plugins_name_their_library_and_deprecation():
    eff = one(check_model(plugin_model("EfficientNMS_TRT", "TRT", **EFFICIENT)), "plugin")
    assert eff.severity == "warning" and "libnvinfer_plugin" in eff.message
    assert "10.12" in eff.message and eff.op == "TRT::EfficientNMS_TRT"
    assert one(check_model(plugin_model("EfficientNMS_TRT", "TRT", **EFFICIENT), "8.6"),
               "plugin").severity == "info"
    bat = one(check_model(plugin_model("BatchedNMSDynamic_TRT", "TRT", **BATCHED)), "plugin")
    assert bat.severity == "warning" and "9.0" in bat.message and "11.0" in bat.message
    mm = one(check_model(plugin_model("TRTBatchedNMS", "mmdeploy", topk=1000, keep_topk=100)),
             "plugin")
    assert mm.severity == "warning" and "libmmdeploy_tensorrt_ops.so" in mm.message


def test_plugin_limits_and_attributes():
    findings = check_model(plugin_model("BatchedNMSDynamic_TRT", "TRT",
                                        **{**BATCHED, "topK": 30000, "keepTopK": 40000}))
    top = [f for f in findings if f.code == "plugin-topk"]
    assert [f.severity for f in top] == ["error", "warning"], top
    assert "topK 30000 > 4096" in top[0].message
    lacking = {k: v for k, v in EFFICIENT.items() if k != "box_coding"}
    f = one(check_model(plugin_model("EfficientNMS_TRT", "TRT", **lacking)), "plugin-attributes")
    assert f.severity == "error" and "box_coding" in f.message


def test_an_unknown_custom_op_needs_a_plugin_nobody_has():
    f = one(check_model(plugin_model("FancyDecode", "example.org")), "plugin")
    assert f.severity == "error" and "'FancyDecode'" in f.message


# -- onnx.checker

def test_a_graph_the_checker_rejects_is_an_error():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Relu", ["t"], ["y"]), helper.make_node("Relu", ["x"], ["t"])]
    f = one(check_model(model_of(nodes, [x], [y])), "onnx-checker")
    assert f.severity == "error" and "topologically sorted" in f.message
    assert "\n" not in f.message


def test_sort_topologically_moves_only_what_must_move():
    from harness.export.plugins import sort_topologically

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    # what onnxruntime's float16 conversion leaves: the input Cast appended last
    nodes = [helper.make_node("Relu", ["xh"], ["a"], name="a"),
             helper.make_node("Neg", ["a"], ["b"], name="b"),
             helper.make_node("Abs", ["x"], ["c"], name="c"),
             helper.make_node("Add", ["b", "c"], ["y"], name="y"),
             helper.make_node("Identity", ["x"], ["xh"], name="cast")]
    model = model_of(nodes, [x], [y])
    sort_topologically(model.graph)
    assert [n.name for n in model.graph.node] == ["c", "cast", "a", "b", "y"]
    onnx.checker.check_model(model, full_check=True)


# -- the data file, versions, JSON

def test_operator_lists_cite_their_source():
    table = operator_table()
    for key, ops in table["versions"].items():
        assert ops["source"].startswith("https://github.com/onnx/onnx-tensorrt/blob/")
        assert len(ops["commit"]) == 40 and "TopK" in ops["supported"]
        assert not set(ops["supported"]) & set(ops["unsupported"])
    assert "3840" in table["versions"]["10.x"]["supported"]["TopK"]


@pytest.mark.parametrize("asked, key", [("10", "10.x"), ("10.x", "10.x"), ("10.3.0", "10.x"),
                                        ("8", "8.6"), ("8.6.1", "8.6")])
def test_versions_resolve(asked, key):
    assert resolve_version(asked) == key


def test_an_unknown_version_is_a_user_error():
    with pytest.raises(UserError, match="no operator list for TensorRT 11"):
        resolve_version("11")


def test_result_to_json(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(topk_model([], k_initializer(30000)), str(path))
    result = check_file(path)
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["trt_version"] == "10.x" and doc["builds"] is False and not result
    assert doc["findings"][0]["code"] == "topk-k-over-limit"


# -- the CLI

def test_cli_exit_status(tmp_path, capsys):
    bad, good = tmp_path / "bad.onnx", tmp_path / "good.onnx"
    onnx.save(topk_model([], k_initializer(30000)), str(bad))
    onnx.save(topk_model([], k_initializer(1000)), str(good))
    assert main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "topk-k-over-limit" in out and "[bbox_head.head_module]" in out
    assert "1 error(s): the TensorRT build will fail" in out
    assert main(["check", str(good)]) == 0
    assert "no errors" in capsys.readouterr().out
    assert main(["check", str(good), "--json", "--trt-version", "8.6"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["trt_version"] == "8.6" and doc["findings"][0]["severity"] == "warning"


def test_cli_names_the_config_setting_behind_k(tmp_path, capsys):
    from harness.models.zoo import FIXTURE_CONFIG

    bad = tmp_path / "bad.onnx"
    onnx.save(topk_model([], k_initializer(30000)), str(bad))
    assert main(["check", str(bad), "--config", str(FIXTURE_CONFIG)]) == 1
    assert "(from model.test_cfg.nms_pre = 30000)" in capsys.readouterr().out


def test_cli_missing_or_corrupt_file_is_status_2(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing.onnx")]) == 2
    assert "ONNX file not found" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not a protobuf at all\xff\xff")
    assert main(["check", str(corrupt)]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read" in err and len(err.splitlines()) == 1
    assert main(["check", str(corrupt), "--trt-version", "11"]) == 2


# -- every file `harness export` writes passes onnx.checker's full check

EXPORTS = [dict(variant=v, precision=p) for v in ("raw", "decoded")
           for p in ("fp32", "fp16", "int8")] + \
          [dict(variant="end2end", nms=n, precision=p) for n in ("onnx", "efficient", "batched")
           for p in ("fp32", "fp16", "int8")]


@pytest.mark.parametrize("fields", EXPORTS, ids=lambda f: "-".join(f.values()))
def test_every_export_passes_the_full_onnx_check(fixture_onnx, fields):
    """full_check runs strict shape inference too. The TRT plugin nodes stay in the graph: the
    checker skips ops of a custom domain it has no schema for (the file imports that domain),
    so the network is fully checked and the plugins are plugin_findings' business."""
    path = fixture_onnx(**fields).path
    onnx.checker.check_model(str(path), full_check=True)
    result = check_file(path)
    assert result, [f.message for f in result.errors]


@pytest.mark.parametrize("pre_topk", [30000, 1000])
def test_end2end_pre_topk_never_becomes_a_topk_over_the_limit(fixture_onnx, pre_topk):
    """The harness's end2end files carry pre_topk as BatchedNMS's topK attribute (clamped to
    4096 at export), not as a TopK node; neither value makes a file TensorRT cannot build."""
    result = fixture_onnx(variant="end2end", nms="batched", pre_topk=pre_topk)
    model = onnx.load(str(result.path))
    assert not [n for n in model.graph.node if n.op_type == "TopK"]
    findings = check_file(result.path).findings
    assert not [f for f in findings if f.severity == "error"], findings
    assert result.metadata["nms"]["pre_topk"] == min(pre_topk, 4096)


# -- export and build

def test_export_prints_the_findings(tmp_path, capsys):
    from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG

    out = tmp_path / "m.onnx"
    assert main(["export", str(FIXTURE_CONFIG), str(FIXTURE_CHECKPOINT), "-o", str(out),
                 "--variant", "end2end", "--nms", "batched"]) == 0
    printed = capsys.readouterr().out
    assert "check: warning: TRT::BatchedNMSDynamic_TRT" in printed
    assert "will not build" not in printed


def test_export_says_when_tensorrt_will_not_build_the_file(tmp_path, capsys):
    from harness.commands.export import report_check

    path = tmp_path / "m.onnx"
    onnx.save(topk_model([], k_initializer(30000)), str(path))
    report_check(path)
    printed = capsys.readouterr().out
    assert "check: error:" in printed and f"TensorRT will not build {path}" in printed


@pytest.fixture
def fake_build(monkeypatch):
    """A `tensorrt` that imports, and a build_engine that records its calls."""
    from harness.backends import tensorrt_build

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    calls = []

    def build_engine(onnx_path, output, **kwargs):
        calls.append(onnx_path)
        side = types.SimpleNamespace(tensorrt_version="10.3.0", gpu_name="fake",
                                     compute_capability="9.0", precision="fp32")
        return types.SimpleNamespace(notes=[], sidecar=side, engine_path=output,
                                     sidecar_path=output, seconds=0.0)

    monkeypatch.setattr(tensorrt_build, "build_engine", build_engine)
    return calls


def test_build_refuses_an_error_before_building(fake_build, tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(topk_model([], k_initializer(30000)), str(path))
    engine = str(tmp_path / "m.engine")
    assert main(["build", str(path), "-o", engine]) == 1
    printed = capsys.readouterr().out
    assert "check: error:" in printed and "refusing to build" in printed and "--force" in printed
    assert fake_build == []
    assert main(["build", str(path), "-o", engine, "--force"]) == 0
    assert fake_build == [path]


def test_build_goes_on_when_nothing_stops_it(fake_build, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(topk_model([], k_initializer(1000)), str(path))
    assert main(["build", str(path), "-o", str(tmp_path / "m.engine")]) == 0
    assert fake_build == [path]


def test_an_end2end_export_with_pre_topk_30000_is_flagged_and_1000_passes(fixture_onnx):
    """The TopK `--nms onnx --pre-topk` writes, at 640 (25200 YOLOv5 candidates): K =
    min(30000, 25200) is over TensorRT's limit and named with the setting behind it."""
    big = fixture_onnx(variant="end2end", nms="onnx", pre_topk=30000, input_size=(640, 640))
    result = check_file(big.path)
    finding = one(result.findings, "topk-k-over-limit")
    assert "K = 25200" in finding.message and "--pre-topk = 30000" in finding.message
    assert not result
    small = fixture_onnx(variant="end2end", nms="onnx", pre_topk=1000, input_size=(640, 640))
    assert check_file(small.path) and "topk-k-over-limit" not in codes(
        check_file(small.path).findings)
    for path in (big.path, small.path):
        onnx.checker.check_model(str(path), full_check=True)
