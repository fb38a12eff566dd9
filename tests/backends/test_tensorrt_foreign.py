"""Engines another tool built (trtexec, mmyolo's easydeploy, mmdeploy): no harness sidecar.
The pure logic (profiles from get_tensor_profile_shape, the inspector's JSON, where each
setting comes from) without TensorRT; then TensorRTBackend.load on the fake runtime of
fake_tensorrt.py: accepted with the warning, I/O and profiles read from the engine, a batch
beyond the profile refused in one line, --onnx / the inspector / neither as the settings
source, and bytes TensorRT cannot read refused with TensorRT's own first line.

The inspector samples below are written by hand after the documented format (trex's parser
and example graphs, NVIDIA/TensorRT#4020's trtexec --exportLayerInfo output): where a real
TensorRT puts a plugin's fields in a DETAILED layer record, if it does, is unconfirmed
(docs/tensorrt-api.md), so the samples with fields are ours, not TensorRT's."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness.backends.tensorrt_backend import TensorRTBackend
from harness.backends.tensorrt_engine_info import (NO_SIDECAR_WARNING, InspectorInfo,
                                                   NmsPlugin, check_onnx_io, decide_settings,
                                                   nms_plugin_from_inspector,
                                                   nms_plugin_from_onnx, parse_inspector_json,
                                                   precision_from_inspector,
                                                   profile_from_shapes, read_engine_io)
from harness.backends.tensorrt_marking import DebugBuild
from harness.backends.tensorrt_plan import BatchProfile
from harness.errors import UserError
from tests.backends.fake_tensorrt import (FAKE_GPU, FakeEngine, batch_profiles, chain_onnx,
                                          fake_engine_bytes, fake_trt, nms_engine_io,
                                          raw_engine_io, use_fake_runtime, use_fake_trt)

NMS_FIELDS = {"score_threshold": 0.25, "iou_threshold": 0.45, "max_output_boxes": 10,
              "background_class": -1, "score_activation": 0, "box_coding": 0}
# as an ONNX float attribute gives them back: float32
ONNX_FIELDS = {k: float(np.float32(v)) if isinstance(v, float) else v
               for k, v in NMS_FIELDS.items()}


def tensor(name: str, fmt: str, dims=(4, 3, 8, 8)) -> dict:
    return {"Name": name, "Location": "Device", "Dimensions": list(dims),
            "Format/Datatype": fmt}


def conv_layer(name: str, fmt: str = "Row major linear FP16 format") -> dict:
    return {"Name": name, "LayerType": "CaskConvolution",
            "Inputs": [tensor("images", "Row major linear FP32")],
            "Outputs": [tensor(f"{name}_output_0", fmt)],
            "ParameterType": "Convolution", "TacticValue": "0x0000000000000001",
            "StreamId": 0, "Metadata": f"[ONNX Layer: {name}]"}


def nms_layer(fields: dict, nested: bool = False) -> dict:
    record = {"Name": "/nms", "LayerType": "PluginV2",
              "Inputs": [tensor("/head/boxes/Relu_output_0", "Row major linear FP32"),
                         tensor("/head/scores/Sigmoid_output_0", "Row major linear FP32")],
              "Outputs": [tensor("num_detections", "Row major linear Int32", (4, 1))],
              "ParameterType": "PluginV2", "TacticValue": "0x0000000000000000",
              "StreamId": 0, "Metadata": "[ONNX Layer: /nms (EfficientNMS_TRT)]"}
    record.update({"PluginFields": dict(fields)} if nested else dict(fields))
    return record


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# -- profiles and I/O ------------------------------------------------------------------------------

def test_profile_from_shapes_reads_min_opt_max_and_static_inputs():
    assert profile_from_shapes("images", (-1, 3, 8, 8), [(1, 3, 8, 8), (4, 3, 8, 8),
                                                         (8, 3, 8, 8)]) == \
        BatchProfile((1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8))
    # a static engine without a usable profile (empty, or dims of -1) takes its own shape
    for shapes in ([], [(-1,), (-1,), (-1,)], [(), (), ()]):
        assert profile_from_shapes("images", (2, 3, 8, 8), shapes) == \
            BatchProfile((2, 3, 8, 8), (2, 3, 8, 8), (2, 3, 8, 8))
    with pytest.raises(UserError, match="dynamic shape .* no shapes for it in optimization "
                                        "profile 1") as exc:
        profile_from_shapes("images", (-1, 3, 8, 8), [], index=1)
    one_line(exc)
    with pytest.raises(UserError, match="not min <= opt <= max"):
        profile_from_shapes("images", (-1, 3, 8, 8), [(4, 3, 8, 8), (1, 3, 8, 8),
                                                      (8, 3, 8, 8)])


def test_engine_io_and_every_profile_read_through_the_engine_api():
    trt, _ = fake_trt()
    profiles = batch_profiles(1, 2, 4) + batch_profiles(8, 8, 16)
    engine = FakeEngine(trt, json.loads(fake_engine_bytes(raw_engine_io(), profiles)[14:]))
    io = read_engine_io(engine, trt)
    assert [(t.name, t.mode, t.shape, t.dtype) for t in io.tensors] == [
        ("images", "input", (-1, 3, 8, 8), "FLOAT"),
        ("cls_scores.0", "output", (-1, 5, 1, 1), "FLOAT"),
        ("bbox_preds.0", "output", (-1, 4, 1, 1), "HALF")]
    assert [t.name for t in io.inputs] == ["images"] and len(io.outputs) == 2
    assert io.profile("images") == BatchProfile((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))
    assert io.profile("images", 1).max == (16, 3, 8, 8)
    assert io.profiles_json()[1] == {"images": {"min": [8, 3, 8, 8], "opt": [8, 3, 8, 8],
                                                "max": [16, 3, 8, 8]}}


# -- the inspector's JSON --------------------------------------------------------------------------

def test_inspector_names_only_and_detailed():
    names = parse_inspector_json(json.dumps({"Layers": ["/conv0", "/nms/EfficientNMS_TRT"],
                                             "Bindings": ["images", "num_detections"]}))
    assert not names.detailed and names.layer_names == ["/conv0", "/nms/EfficientNMS_TRT"]
    assert names.bindings == ("images", "num_detections") and names.note is None
    detailed = parse_inspector_json(json.dumps({"Layers": [conv_layer("/conv0"),
                                                           nms_layer(NMS_FIELDS)],
                                                "Bindings": ["images"]}))
    assert detailed.detailed and detailed.layer_names == ["/conv0", "/nms"]
    for text, note in ((None, "gave nothing"), ("", "gave nothing"),
                       ("{not json", "not JSON"), ('{"Bindings": []}', "no Layers list"),
                       ('{"Layers": []}', "lists no layers")):
        info = parse_inspector_json(text)
        assert not info.records and note in info.note


def test_nms_plugin_from_the_inspector():
    def info(*layers, detailed=True):
        return InspectorInfo(detailed=detailed, records=tuple(
            layer if isinstance(layer, dict) else {"Name": layer} for layer in layers))

    found = nms_plugin_from_inspector(info(conv_layer("/conv0"), nms_layer(NMS_FIELDS)))
    assert found == NmsPlugin("EfficientNMS_TRT", "/nms", NMS_FIELDS, "engine inspector")
    assert not found.missing
    nested = nms_plugin_from_inspector(info(nms_layer(
        {k: str(v) for k, v in NMS_FIELDS.items()}, nested=True)))
    assert nested.attributes == NMS_FIELDS  # numeric strings read as numbers
    bare = nms_plugin_from_inspector(info(nms_layer({})))
    assert bare.attributes == {} and "score_threshold" in bare.missing
    # names only: the op type in the layer's name, no fields
    assert nms_plugin_from_inspector(info("/conv0", "/model.22/EfficientNMS_TRT",
                                          detailed=False)) == \
        NmsPlugin("EfficientNMS_TRT", "/model.22/EfficientNMS_TRT", {}, "layer name")
    assert nms_plugin_from_inspector(info("/conv0", detailed=False)) is None
    # BatchedNMSDynamic_TRT is not read as BatchedNMS_TRT
    assert nms_plugin_from_inspector(info("/BatchedNMSDynamic_TRT", detailed=False)).op_type \
        == "BatchedNMSDynamic_TRT"
    other = dict(nms_layer({}), Name="/roi", Metadata="[ONNX Layer: /roi (RoIAlign_TRT)]")
    assert nms_plugin_from_inspector(info(other)) is None


@pytest.mark.parametrize("formats, precision", [
    (["Row major linear FP32", "Row major Int8 format", "Channel major FP16 format"], "int8"),
    (["Row major linear FP32", "Channel major FP16 format where channel % 4 == 0"], "fp16"),
    (["Row major linear FP32", "Row major linear Int32"], "fp32"),
    (["Row major linear BFloat16 format"], None),
    ([], None),
])
def test_precision_from_the_inspectors_tensor_formats(formats, precision):
    records = tuple({"Name": f"l{i}", "Outputs": [tensor("t", f)]} for i, f in
                    enumerate(formats))
    assert precision_from_inspector(InspectorInfo(detailed=True, records=records)) == precision
    assert precision_from_inspector(InspectorInfo(records=({"Name": "l0"},))) is None


# -- where each setting comes from -----------------------------------------------------------------

def detailed(*layers) -> InspectorInfo:
    return parse_inspector_json(json.dumps({"Layers": list(layers)}))


def names_only(*names) -> InspectorInfo:
    return parse_inspector_json(json.dumps({"Layers": list(names)}))


ONNX_NMS = NmsPlugin("EfficientNMS_TRT", "/nms", ONNX_FIELDS, "source onnx")


def test_settings_from_the_inspector_when_it_shows_every_field():
    got = decide_settings(detailed(conv_layer("/c"), nms_layer(NMS_FIELDS)), False, None)
    assert got.settings_source == "engine inspector" and got.nms.attributes == NMS_FIELDS
    assert (got.precision, got.precision_source) == ("fp16", "engine inspector")
    assert any("give --onnx" in n and "layer diff" in n for n in got.notes)
    # a detailed inspector without an NMS plugin layer says the engine has none
    plain = decide_settings(detailed(conv_layer("/c")), False, None)
    assert plain.settings_source == "engine inspector" and plain.nms is None
    # the same with a source ONNX whose NMS differs: said, the engine's kept
    other = NmsPlugin("EfficientNMS_TRT", "/nms", dict(NMS_FIELDS, score_threshold=0.5))
    got = decide_settings(detailed(nms_layer(NMS_FIELDS)), True, other)
    assert got.settings_source == "engine inspector" and got.nms.attributes == NMS_FIELDS
    assert any("score_threshold 0.25 (engine) vs 0.5 (ONNX)" in n for n in got.notes)
    assert not any("give --onnx" in n for n in got.notes)
    # an ONNX float attribute comes back at float32: not a difference
    rounded = NmsPlugin("EfficientNMS_TRT", "/nms",
                        dict(NMS_FIELDS, iou_threshold=float(np.float32(0.45))))
    assert not decide_settings(detailed(nms_layer(NMS_FIELDS)), True, rounded).notes
    missing = decide_settings(detailed(conv_layer("/c")), True, ONNX_NMS)
    assert any("has EfficientNMS_TRT but the engine has no NMS plugin" in n
               for n in missing.notes)
    # a plugin layer whose type nothing names is not "no NMS"
    anonymous = dict(nms_layer(NMS_FIELDS), Metadata="")
    got = decide_settings(detailed(conv_layer("/c"), anonymous), False, None)
    assert got.settings_source == "assumed" and got.nms is None
    assert any("plugin layer(s) '/nms' of a type the harness does not know" in n
               for n in got.notes)
    assert decide_settings(detailed(anonymous), True, ONNX_NMS).settings_source == \
        "source onnx"


def test_settings_from_the_source_onnx_when_the_inspector_gives_names_only():
    got = decide_settings(names_only("/c", "/nms/EfficientNMS_TRT"), True, ONNX_NMS)
    assert got.settings_source == "source onnx" and got.nms == ONNX_NMS
    assert (got.precision, got.precision_source) == ("unknown", "unknown")
    # fields missing from a detailed record: the ONNX's
    partial = decide_settings(detailed(nms_layer({"score_threshold": 0.25})), True, ONNX_NMS)
    assert partial.settings_source == "source onnx" and partial.nms == ONNX_NMS
    # an ONNX without NMS for an engine whose layer names show one
    raw = decide_settings(names_only("/nms/EfficientNMS_TRT"), True, None)
    assert raw.settings_source == "source onnx" and raw.nms is None
    assert any("has no NMS plugin but the engine has EfficientNMS_TRT" in n for n in raw.notes)
    assert decide_settings(names_only("/c"), True, None, "fp16").precision_source == "user"


def test_settings_assumed_without_inspector_details_or_onnx():
    got = decide_settings(names_only("/c", "/nms/EfficientNMS_TRT"), False, None)
    assert got.settings_source == "assumed"
    assert got.nms == NmsPlugin("EfficientNMS_TRT", "/nms/EfficientNMS_TRT", {}, "layer name")
    assert any("EfficientNMS_TRT seen in layer" in n and "ProfilingVerbosity.DETAILED" in n
               for n in got.notes)
    none = decide_settings(parse_inspector_json(""), False, None)
    assert none.settings_source == "assumed" and none.nms is None
    assert any("none assumed" in n for n in none.notes)


def test_another_tools_nms_plugin_is_recognised(tmp_path):
    """mmdeploy's TensorRT exports end in `mmdeploy::TRTBatchedNMS` (tests/foreign/README.md),
    a plugin of its own library: recorded from the ONNX or a layer's name; replayed only
    when harness.nms.plugin_nodes has a kernel for it (said otherwise); never the
    inspector's "settings" while the fields its creator requires are not known here."""
    from onnx import helper

    from harness.backends.tensorrt_engine_info import replayed_ops

    node = helper.make_node("TRTBatchedNMS", ["boxes", "scores"], ["dets", "labels"],
                            name="/TRTBatchedNMS", domain="mmdeploy", iou_threshold=0.65,
                            keep_topk=100)
    onnx_nms = nms_plugin_from_onnx([node])
    assert onnx_nms.op_type == "TRTBatchedNMS" and onnx_nms.attributes["keep_topk"] == 100
    assert onnx_nms.replayed == ("TRTBatchedNMS" in replayed_ops())
    got = decide_settings(names_only("/c", "/TRTBatchedNMS"), True, onnx_nms)
    assert got.settings_source == "source onnx" and got.nms == onnx_nms
    record = dict(nms_layer({"iou_threshold": 0.65}), Name="/TRTBatchedNMS", Metadata="")
    seen = decide_settings(detailed(record), False, None)
    assert seen.settings_source == "assumed" and seen.nms.op_type == "TRTBatchedNMS"
    rotated = nms_plugin_from_onnx([helper.make_node(
        "TRTBatchedRotatedNMS", ["b", "s"], ["d", "l"], name="/rot", domain="mmdeploy")])
    assert not rotated.replayed
    notes = decide_settings(names_only("/rot"), True, rotated).notes
    assert any("TRTBatchedRotatedNMS (layer '/rot') is a plugin the harness does not "
               "replay" in n for n in notes)


def test_onnx_io_must_be_the_engines():
    trt, _ = fake_trt()
    engine = FakeEngine(trt, json.loads(fake_engine_bytes(nms_engine_io(),
                                                          batch_profiles())[14:]))
    io = read_engine_io(engine, trt)
    check_onnx_io(io, ["images"], ["detection_boxes", "num_detections", "detection_scores",
                                   "detection_classes"], "m.onnx", "m.engine")
    with pytest.raises(UserError, match=r"m.onnx is not the source of m.engine: its I/O "
                                        r"\(images → out\)") as exc:
        check_onnx_io(io, ["images"], ["out"], "m.onnx", "m.engine")
    one_line(exc)


def test_debug_build_of_an_engine_without_sidecar():
    profile = BatchProfile((2, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8))
    build = DebugBuild.of_foreign("ab" * 32, "fp16", profile, "10.13.0", *FAKE_GPU)
    assert (build.min_batch, build.opt_batch, build.max_batch) == (2, 4, 8)
    assert build.tf32 and build.precision == "fp16"
    with pytest.raises(UserError, match="precision is unknown") as exc:
        DebugBuild.of_foreign("ab" * 32, "unknown", profile, "10.13.0", *FAKE_GPU)
    one_line(exc)


# -- TensorRTBackend on the fake runtime -----------------------------------------------------------

def write_engine(tmp_path: Path, name: str = "model.engine", **spec) -> Path:
    spec.setdefault("io", raw_engine_io())
    spec.setdefault("profiles", batch_profiles())
    path = tmp_path / name
    path.write_bytes(fake_engine_bytes(**spec))
    return path


def test_engine_without_sidecar_is_accepted_with_the_warning_printed_once(
        monkeypatch, tmp_path, capsys):
    use_fake_runtime(monkeypatch)
    backend = TensorRTBackend(write_engine(tmp_path, profiles=batch_profiles(2, 4, 8)))
    backend.load()
    backend.load()
    printed = capsys.readouterr().err
    assert printed.count(NO_SIDECAR_WARNING) == 1
    info = backend.describe()
    assert info["sidecar"] is False and info["warnings"][0] == NO_SIDECAR_WARNING
    assert info["settings_source"] == "assumed" and info["nms_plugin"] is None
    assert info["precision"] == "unknown" and info["precision_source"] == "unknown"
    assert backend.precision == "unknown" and backend.source_onnx() is None
    assert info["io"] == [{"name": "images", "mode": "input", "shape": [-1, 3, 8, 8],
                           "dtype": "FLOAT"},
                          {"name": "cls_scores.0", "mode": "output", "shape": [-1, 5, 1, 1],
                           "dtype": "FLOAT"},
                          {"name": "bbox_preds.0", "mode": "output", "shape": [-1, 4, 1, 1],
                           "dtype": "HALF"}]
    assert info["profile"] == {"min": [2, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [8, 3, 8, 8]}
    assert info["profiles"] == [{"images": info["profile"]}]
    assert info["input"] == {"name": "images", "shape": [-1, 3, 8, 8]}
    assert info["outputs"] == ["cls_scores.0", "bbox_preds.0"]
    assert info["tensorrt"] == "10.13.0" and info["gpu"] == FAKE_GPU[0]
    assert info["variant"] == "unknown" and info["marked_layers"] == 0
    assert backend.intermediate_names() == [] and backend._dtypes["bbox_preds.0"] == np.float16
    assert any("give --onnx" in w for w in info["warnings"])
    with pytest.raises(UserError, match="no source ONNX names its layers; give --onnx"):
        backend.debug_build()


def test_batch_beyond_the_engines_profile_is_refused_in_one_line(monkeypatch, tmp_path):
    use_fake_runtime(monkeypatch)
    backend = TensorRTBackend(write_engine(tmp_path))
    x = np.zeros((5, 3, 8, 8), np.float32)
    with pytest.raises(UserError, match=r"input \(5, 3, 8, 8\) is outside model.engine's "
                                        r"profile .*it takes batches of 1 to 4.*--batch 4"
                       ) as exc:
        backend.infer(x)  # refused before any device work (there is none here)
    one_line(exc)
    static = TensorRTBackend(write_engine(tmp_path, "static.engine", io=raw_engine_io(batch=1),
                                          profiles=[]))
    with pytest.raises(UserError, match="batches of 1 to 1"):
        static.infer(np.zeros((4, 3, 8, 8), np.float32))
    assert static.describe()["profile"]["max"] == [1, 3, 8, 8]
    wrong_size = np.zeros((1, 3, 16, 16), np.float32)
    with pytest.raises(UserError, match="outside"):
        backend.infer(wrong_size)


def test_source_onnx_gives_the_layer_names_and_nms_settings(monkeypatch, tmp_path):
    use_fake_runtime(monkeypatch)
    onnx_path = chain_onnx(tmp_path / "model.onnx", 3, nms=True)
    engine = write_engine(tmp_path, io=nms_engine_io(),
                          layers=["/backbone/layer0/Relu", "/nms"])  # names only, no op type
    backend = TensorRTBackend(engine, given_onnx=onnx_path)
    backend.load()
    info = backend.describe()
    assert info["settings_source"] == "source onnx"
    assert info["nms_plugin"] == {"op_type": "EfficientNMS_TRT", "layer": "/nms",
                                  "found_by": "source onnx", "attributes": ONNX_FIELDS}
    assert backend.source_onnx() == onnx_path and info["onnx"] == str(onnx_path)
    assert info["variant"] == "end2end" and info["nms"] == "EfficientNMS_TRT"
    assert not any("give --onnx" in w for w in info["warnings"])
    # the debug engines need the precision, which nothing here says
    with pytest.raises(UserError, match="precision is unknown"):
        backend.debug_build()
    given = TensorRTBackend(engine, given_onnx=onnx_path, precision="fp16")
    build = given.debug_build()
    assert (build.precision, build.min_batch, build.max_batch, build.tf32) == \
        ("fp16", 1, 4, True)
    assert given.describe()["precision_source"] == "user"


def test_an_onnx_that_is_not_the_engines_source_is_refused(monkeypatch, tmp_path):
    use_fake_runtime(monkeypatch)
    onnx_path = chain_onnx(tmp_path / "raw.onnx", 2)  # output "out"
    with pytest.raises(UserError, match="raw.onnx is not the source of model.engine") as exc:
        TensorRTBackend(write_engine(tmp_path, io=nms_engine_io()), given_onnx=onnx_path).load()
    one_line(exc)
    with pytest.raises(UserError, match="ONNX file not found"):
        TensorRTBackend(write_engine(tmp_path), given_onnx=tmp_path / "gone.onnx").load()


def test_inspector_with_an_efficient_nms_layer_gives_its_attributes(monkeypatch, tmp_path):
    use_fake_runtime(monkeypatch)
    engine = write_engine(tmp_path, io=nms_engine_io(), verbosity="DETAILED",
                          layers=[conv_layer("/backbone/layer0/Relu"), nms_layer(NMS_FIELDS)])
    backend = TensorRTBackend(engine)
    backend.load()
    info = backend.describe()
    assert info["settings_source"] == "engine inspector"
    assert info["nms_plugin"]["attributes"] == NMS_FIELDS
    assert info["nms_plugin"]["found_by"] == "engine inspector"
    assert (info["precision"], info["precision_source"]) == ("fp16", "engine inspector")
    assert info["profiling_verbosity"] == "DETAILED" and info["inspector"]["detailed"]
    # the inspector was given a context with the input shape set (dynamic dims resolved)
    (context,) = backend._engine.contexts
    assert context.input_shapes == {"images": (4, 3, 8, 8)}
    # an ONNX that says otherwise is noted, the engine's own fields kept
    other = tmp_path / "other.onnx"
    chain_onnx(other, 1, nms=True)
    import onnx

    model = onnx.load(str(other))
    next(a for a in model.graph.node[-1].attribute if a.name == "score_threshold").f = 0.5
    onnx.save(model, str(other))
    again = TensorRTBackend(engine, given_onnx=other)
    again.load()
    info = again.describe()
    assert info["settings_source"] == "engine inspector"
    assert info["nms_plugin"]["attributes"]["score_threshold"] == 0.25
    assert any("score_threshold 0.25 (engine) vs 0.5 (ONNX)" in w for w in info["warnings"])


def test_neither_inspector_details_nor_onnx_is_assumed(monkeypatch, tmp_path):
    use_fake_runtime(monkeypatch)
    engine = write_engine(tmp_path, io=nms_engine_io(),
                          layers=[conv_layer("/c"), nms_layer(NMS_FIELDS, nested=True)])
    backend = TensorRTBackend(engine)  # LAYER_NAMES_ONLY: the names, not the records
    backend.load()
    info = backend.describe()
    assert info["settings_source"] == "assumed"
    assert info["nms_plugin"] is None  # "/nms": no op type in the name
    none = TensorRTBackend(write_engine(tmp_path, "none.engine", verbosity="NONE"))
    none.load()
    info = none.describe()
    assert info["settings_source"] == "assumed"
    assert any("gave nothing" in w for w in info["warnings"])


@pytest.mark.parametrize("spec, said", [
    ({"corrupt": True}, "Magic tag does not match"),
    ({"built_with": "10.0.1"}, "Version tag does not match"),
    ({"compute": "8.6"}, "generated on an incompatible device, expecting compute 8.6"),
])
def test_bytes_tensorrt_cannot_read_give_its_own_first_line(monkeypatch, tmp_path, capsys,
                                                            spec, said):
    use_fake_runtime(monkeypatch)
    path = tmp_path / "model.engine"
    if spec.get("corrupt"):
        path.write_bytes(b"\x00garbage")
    else:
        path.write_bytes(fake_engine_bytes(raw_engine_io(), batch_profiles(), **spec))
    with pytest.raises(UserError, match="TensorRT 10.13.0 cannot deserialize model.engine: "
                                        ".*" + said) as exc:
        TensorRTBackend(path).load()
    message = one_line(exc)
    assert "Engine deserialization failed" not in message  # the first error, not the last
    assert "harness build" not in message  # nothing to rebuild with the harness
    assert said in capsys.readouterr().err  # TensorRT's log, as trt.Logger prints it


def test_each_load_says_its_own_error_through_the_one_shared_logger(monkeypatch, tmp_path):
    from harness.backends.tensorrt_build import shared_logger

    trt = use_fake_runtime(monkeypatch)
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"\0")
    old = write_engine(tmp_path, "old.engine", built_with="10.0.1")
    with pytest.raises(UserError, match="Magic tag"):
        TensorRTBackend(bad).load()
    with pytest.raises(UserError, match="Version tag") as exc:
        TensorRTBackend(old).load()
    assert "Magic tag" not in str(exc.value)
    TensorRTBackend(write_engine(tmp_path)).load()
    assert len(trt.runtimes) == 3
    assert all(r.logger is shared_logger(trt) for r in trt.runtimes)
    assert len(shared_logger(trt).errors) == 4  # two lines per failure, as TensorRT logs


def test_check_against_an_onnx_still_needs_the_sidecar(monkeypatch, tmp_path):
    """The coco cache (ModelFiles.engine) reuses an engine only when its sidecar matches the
    ONNX: an engine whose sidecar is gone is rebuilt, not taken as another tool's."""
    use_fake_runtime(monkeypatch)
    onnx_path = chain_onnx(tmp_path / "model.onnx", 2)
    with pytest.raises(UserError, match="model.engine.json is missing") as exc:
        TensorRTBackend(write_engine(tmp_path), onnx_path=onnx_path).load()
    one_line(exc)


def test_engine_with_sidecar_still_checked_and_described_as_before(monkeypatch, tmp_path):
    from harness.backends import tensorrt_build

    use_fake_trt(monkeypatch)
    trt = use_fake_runtime(monkeypatch)
    onnx_path = chain_onnx(tmp_path / "model.onnx", 2)
    engine = tensorrt_build.build_engine(onnx_path, tmp_path / "model.engine",
                                         precision="fp16").engine_path
    io = [{"name": "images", "mode": "input", "shape": [-1, 3, 8, 8], "dtype": "FLOAT"},
          {"name": "out", "mode": "output", "shape": [-1, 3, 8, 8], "dtype": "FLOAT"}]
    engine.write_bytes(fake_engine_bytes(io, batch_profiles(), built_with=trt.__version__))
    backend = TensorRTBackend(engine, onnx_path=onnx_path, precision="fp16")
    backend.load()
    info = backend.describe()
    assert info["sidecar"] and info["settings_source"] == "sidecar" and info["warnings"] == []
    assert info["precision"] == "fp16" and info["variant"] is None
    assert backend.debug_build() == DebugBuild.of(backend.sidecar)
    assert backend.source_onnx() == onnx_path.resolve()
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    with pytest.raises(UserError, match="has changed since the engine was built"):
        TensorRTBackend(engine, given_onnx=onnx_path).load()


def test_nms_plugin_from_onnx_follows_the_pipelines_choice(tmp_path):
    import onnx
    from onnx import helper

    nodes = list(onnx.load(str(chain_onnx(tmp_path / "m.onnx", 1, nms=True))).graph.node)
    assert nms_plugin_from_onnx(nodes) == ONNX_NMS
    assert nms_plugin_from_onnx(nodes[:-1]) is None
    first = helper.make_node("NonMaxSuppression", ["b", "s"], ["i"], name="/onnx_nms")
    assert nms_plugin_from_onnx([first, *nodes]) is None


def test_a_two_stage_engine_takes_img_shape_and_nothing_else(monkeypatch, tmp_path):
    """An engine whose second input is img_shape loads (the backend feeds each image's
    img_shape); any other second input is one line."""
    use_fake_runtime(monkeypatch)
    shape_in = {"name": "img_shape", "mode": "input", "shape": [-1, 2], "dtype": "FLOAT"}
    profiles = [{**batch_profiles()[0], "img_shape": [[1, 2], [4, 2], [4, 2]]}]
    two = TensorRTBackend(write_engine(tmp_path, "two.engine",
                                       io=raw_engine_io()[:1] + [shape_in] + raw_engine_io()[1:],
                                       profiles=profiles))
    two.load()
    assert two.input_name == "images" and two.extra_inputs == ["img_shape"]
    other = TensorRTBackend(write_engine(tmp_path, "other.engine",
                                         io=raw_engine_io()[:1] + [{**shape_in, "name": "scale"}]
                                         + raw_engine_io()[1:],
                                         profiles=[{**batch_profiles()[0],
                                                    "scale": [[1, 2], [4, 2], [4, 2]]}]))
    with pytest.raises(UserError, match="has inputs images, scale") as exc:
        other.load()
    one_line(exc)
