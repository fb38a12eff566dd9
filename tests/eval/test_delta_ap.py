"""ΔAP split into what the numbers cost and what the NMS cost (harness.eval.delta_ap), on
planted rows: an end2end file whose ONNX NMS has a pre-NMS TopK of 30 loses AP in its NMS and
none in its numbers; an fp16 raw file (the reference's NMS) loses it in its numbers only. The
parts add up to ΔAP."""
from __future__ import annotations

import pytest

from harness.eval.runner import run_coco
from harness.experiment import Configuration
from harness.export.onnx_export import ExportSettings, export_onnx
from harness.models.config import load_model_source
from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG
from harness.settings import CocoSettings

pytestmark = pytest.mark.slow


def test_planted_topk_cut_is_nms_and_fp16_is_numbers(synth_val, tmp_path):
    model = load_model_source(FIXTURE_CONFIG, FIXTURE_CHECKPOINT)
    cut = export_onnx(model, tmp_path / "topk30.onnx", ExportSettings(
        variant="end2end", nms="onnx", pre_topk=30)).path
    configs = (Configuration("torch", "cpu", "fp32", 4),
               Configuration("onnxruntime", "cpu", "fp32", 4),
               Configuration("onnxruntime", "cpu", "fp16", 4))
    settings = CocoSettings(images_dir=synth_val, annotations=None, config=FIXTURE_CONFIG,
                            checkpoint=FIXTURE_CHECKPOINT, cache_dir=tmp_path / "cache",
                            configurations=configs, onnx={"fp32": cut}, warmup=0, runs=1,
                            progress=False, evaluator="pycocotools")
    doc, _ = run_coco(settings, log=lambda m: None)
    rows = {(r.backend, r.precision): r for r in doc.rows}
    ref, topk, fp16 = rows["torch", "fp32"], rows["onnxruntime", "fp32"], \
        rows["onnxruntime", "fp16"]
    assert topk.delta_AP < -0.01, topk.delta_AP  # the TopK of 30 costs AP
    parts = topk.delta_AP_parts
    assert parts["numeric"] + parts["nms"] == pytest.approx(topk.delta_AP, abs=1e-9)
    assert abs(parts["numeric"]) <= 0.002 and parts["nms"] == pytest.approx(
        topk.delta_AP, abs=0.002), parts
    assert "through the reference's NMS" in parts["how"]
    # its candidates through its own NMS gave its detections on every image: the split is
    # of what it really stored
    assert parts["replay_disagrees"] == 0 and "approximate" not in parts["how"]
    # per COCO size range and per class the parts add up to that range's / class's ΔAP
    for size, p in parts["sizes"].items():
        assert p["numeric"] + p["nms"] == pytest.approx(getattr(topk, size) - getattr(ref, size))
    assert parts["per_class"]
    for name, p in parts["per_class"].items():
        assert p["numeric"] + p["nms"] == pytest.approx(topk.per_class[name] -
                                                        ref.per_class[name])
        assert abs(p["numeric"]) <= 0.01, (name, p)
    # by cause: a TopK of 30 costs AP through top-k cuts; restoring each cause's detections
    # gives back the NMS part, up to the causes' interaction
    by = parts["nms_by_cause"]
    assert max(by, key=lambda c: -by[c]) == "topk_cut", by
    assert parts["nms_causes"]["topk_cut"]["detections"] > 50
    assert sum(by.values()) + parts["nms_unattributed"] == pytest.approx(parts["nms"])
    assert abs(parts["nms_unattributed"]) <= 0.1 * abs(parts["nms"]), parts
    from harness.report.coco_report import delta_split_table

    split_md = delta_split_table(doc)
    assert "topk_cut -" in split_md.replace("−", "-") and "unattributed" in split_md, split_md
    f16 = fp16.delta_AP_parts
    assert f16["nms"] == 0.0 and f16["numeric"] == pytest.approx(fp16.delta_AP, abs=1e-12)
    assert "nms_by_cause" not in f16  # nothing to split: its NMS is the reference's
    assert "its NMS is the reference's" in f16["how"]
    assert ref.delta_AP_parts["nms"] == 0.0 and ref.delta_AP_parts["numeric"] == 0.0


class _EngineStandIn:
    """A deployed end2end TensorRT engine as the ΔAP split sees it: its name, its source
    ONNX and its outputs (onnxruntime on that ONNX gives them; nothing here runs TensorRT)."""

    name = "tensorrt"

    def __init__(self, path):
        from harness.backends.onnxruntime_backend import OnnxruntimeBackend

        self.path, self.session = path, OnnxruntimeBackend(path, provider="cpu")

    def source_onnx(self):
        return self.path

    def infer(self, inputs, metas=None):
        return self.session.infer(inputs)


class _Shifted:
    """A debug engine whose marking moved the candidate boxes by 5 px."""

    def __init__(self, inner):
        self.inner = inner

    def intermediates(self, inputs, names):
        values = dict(self.inner.intermediates(inputs, names))
        values[names[0]] = values[names[0]] + 5.0
        return values


def test_a_tensorrt_end2end_row_reads_its_candidates_from_a_debug_engine(
        tmp_path, fixture_batch, monkeypatch):
    """A TensorRT end2end row is split through a debug engine marking the NMS plugin's inputs
    (built by tensorrt_marking.ChunkedDebugEngines with the engine's settings); each image's
    candidates replayed through the file's NMS must give the engine's detections, and an
    image where they do not is flagged rather than split as if they did."""
    from harness.eval import delta_ap

    model = load_model_source(FIXTURE_CONFIG, FIXTURE_CHECKPOINT)
    path = export_onnx(model, tmp_path / "e2e.onnx", ExportSettings(
        variant="end2end", nms="onnx", pre_topk=30)).path
    engine = _EngineStandIn(path)
    outputs = engine.infer(fixture_batch.inputs)
    metas = fixture_batch.metas

    assert delta_ap.reference_nms_post(model, engine)[0] is None  # no place to build it
    post, how = delta_ap.reference_nms_post(model, engine, tmp_path / "debug",
                                            lambda *a: engine.session)
    assert "read by a debug engine marking them" in how
    refs = post(outputs, metas, fixture_batch.inputs)
    assert len(refs) == len(metas) and all(r.replay_agrees for r in refs)
    assert sum(len(r.result) for r in refs) > 0

    post, _ = delta_ap.reference_nms_post(model, engine, tmp_path / "debug",
                                          lambda *a: _Shifted(engine.session))
    shifted = post(outputs, metas, fixture_batch.inputs)
    found = [r.replay_agrees for r in shifted]
    assert found.count(False) == sum(len(r.result) > 0 for r in refs) > 0
    records = {i: {"reference_replay_agrees": a} for i, a in enumerate(found)}
    assert delta_ap.replay_disagreements(records, list(records)) == found.count(False)

    # the default reader: debug engines marking the NMS inputs as compare plans them (an
    # ONNX NonMaxSuppression's as layers; a plugin's in an engine of their own)
    made = {}

    class Recording:
        def __init__(self, deployed, onnx_path, layer_tensors, nms_inputs, work_dir,
                     **kwargs):
            made.update(layers=list(layer_tensors), nms=list(nms_inputs),
                        settings=kwargs.get("settings"), work_dir=work_dir)

        def load(self):
            made["loaded"] = True

    import harness.backends.tensorrt_marking as marking

    monkeypatch.setattr(marking, "ChunkedDebugEngines", Recording)
    engine.debug_build = lambda: "the engine's own settings"
    import onnx

    proto = onnx.load(str(path))
    pipeline = __import__("harness.align.pipelines", fromlist=["pipeline_for"]) \
        .pipeline_for(model, proto)
    from harness.align.compare import producers
    from harness.backends.tensorrt_marking import split_marking

    delta_ap.nms_inputs_engine(engine, path, proto, pipeline, tmp_path / "debug")
    layers, nms = split_marking(list(proto.graph.node), producers(proto, pipeline.inputs))
    assert made == {"layers": layers, "nms": nms, "loaded": True,
                    "settings": "the engine's own settings", "work_dir": tmp_path / "debug"}
    assert set(pipeline.inputs[:2]) <= set(layers + nms)
    # a plugin's (EfficientNMS_TRT) two inputs: in an engine of their own, no layers
    from types import SimpleNamespace

    from tests.backends.fake_tensorrt import BOXES, SCORES, chain_onnx

    plugin = chain_onnx(tmp_path / "plugin.onnx", layers=3, nms=True)
    made.clear()
    delta_ap.nms_inputs_engine(engine, plugin, onnx.load(str(plugin)),
                               SimpleNamespace(inputs=[BOXES, SCORES]), tmp_path / "debug")
    assert made["layers"] == [] and made["nms"] == [BOXES, SCORES]
