"""Chunked marking for the TensorRT layer diff: the plan (chunks in order, cache keys and
files, which engine gives which tensor, one engine alive, the drift record) without TensorRT,
then ChunkedDebugEngines over build_engine with the fake `tensorrt` of fake_tensorrt.py: N
layers in chunks of k give ceil(N/k) debug engines, each built once with exactly its chunk
marked, never two loaded at once, the NMS plugin's inputs in an engine of their own, and the
marking figure the largest over the engines."""
from __future__ import annotations

import math
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from harness.backends import tensorrt_build
from harness.backends.tensorrt_backend import TensorRTBackend
from harness.backends.tensorrt_marking import (NMS_INPUTS, ChunkedDebugEngines, DebugBuild,
                                               MarkingDrift, OneAtATime, cached_engine_found,
                                               debug_engine_key, marking_plan, relative_l2,
                                               route, split_marking)
from harness.errors import UserError
from tests.backends.fake_tensorrt import (BOXES, SCORES, FakeDebugEngines, FakeDeployed,
                                          chain_onnx, final_outputs, layer_name, layer_tensor,
                                          tensor_value, use_fake_trt)

BUILD = DebugBuild(onnx_sha256="ab" * 32, precision="fp16", min_batch=1, opt_batch=4,
                   max_batch=4, tf32=False, workspace_gb=4.0, tensorrt_version="10.13.0",
                   gpu_name="Test GPU", compute_capability="9.0")
TENSORS = [f"/t{i}_output_0" for i in range(10)]


# -- the plan, without TensorRT ------------------------------------------------------------------

def test_plan_chunks_layers_in_order_and_keeps_nms_inputs_apart(tmp_path):
    sets = marking_plan(TENSORS + TENSORS[:2], [BOXES, SCORES], BUILD, tmp_path, "m", chunk=4)
    assert [s.tensors for s in sets] == [tuple(TENSORS[:4]), tuple(TENSORS[4:8]),
                                         tuple(TENSORS[8:]), (BOXES, SCORES)]
    assert [s.label for s in sets] == ["layers 1-4 of 10", "layers 5-8 of 10",
                                       "layers 9-10 of 10", NMS_INPUTS]
    assert len({s.path for s in sets}) == 4
    assert all(s.path.parent == tmp_path and s.path.name.startswith("m.marked-")
               and s.path.suffix == ".engine" for s in sets)
    assert len(marking_plan(TENSORS, [], BUILD, tmp_path, "m", chunk=32)) == 1
    assert marking_plan([], [], BUILD, tmp_path, "m") == []
    with pytest.raises(UserError, match="chunk size"):
        marking_plan(TENSORS, [], BUILD, tmp_path, "m", chunk=0)


def test_cache_key_covers_tensors_their_order_the_onnx_and_the_settings():
    key = debug_engine_key(BUILD, TENSORS[:4])
    assert debug_engine_key(BUILD, list(TENSORS[:4])) == key  # the same chunk, the same file
    assert debug_engine_key(BUILD, TENSORS[1:5]) != key
    assert debug_engine_key(BUILD, TENSORS[:4][::-1]) != key
    for change in ({"onnx_sha256": "cd" * 32}, {"precision": "fp32"}, {"max_batch": 8},
                   {"tf32": True}, {"tensorrt_version": "10.0.1"}, {"gpu_name": "Other"}):
        assert debug_engine_key(replace(BUILD, **change), TENSORS[:4]) != key, change


def test_route_sends_each_name_to_its_chunk_in_chunk_order(tmp_path):
    sets = marking_plan(TENSORS, [BOXES, TENSORS[9]], BUILD, tmp_path, "m", chunk=4)
    # a request spanning three chunks, out of order: grouped per engine, front to back
    assert route([TENSORS[9], TENSORS[1], TENSORS[5], TENSORS[0]], sets) == [
        (0, [TENSORS[1], TENSORS[0]]), (1, [TENSORS[5]]), (2, [TENSORS[9]])]
    # the NMS inputs as the candidates ask for them: their own engine, even when a layer
    # chunk marks one of them too; a layer request goes to the layer chunk
    assert route([BOXES, TENSORS[9]], sets) == [(3, [BOXES, TENSORS[9]])]
    assert route([TENSORS[9]], sets) == [(2, [TENSORS[9]])]
    assert route([TENSORS[8], BOXES], sets) == [(2, [TENSORS[8]]), (3, [BOXES])]
    assert route([], sets) == []
    with pytest.raises(UserError, match=r"no debug engine marks '/nowhere' \(and 1 more\)"):
        route([TENSORS[0], "/nowhere", "/else"], sets)


def test_one_at_a_time_closes_the_previous_before_opening_the_next():
    events = []
    alive = set()

    def open_(key):
        assert not alive, "two open at once"
        alive.add(key)
        events.append(("open", key))
        return f"engine {key}"

    def close(value):
        alive.discard(int(value.split()[1]))
        events.append(("close", value))

    loaded = OneAtATime(open_, close)
    assert loaded.get(0) == "engine 0" and loaded.get(0) == "engine 0"  # reused, not reopened
    loaded.get(1)
    loaded.get(0)
    assert loaded.key == 0
    loaded.close()
    loaded.close()
    assert loaded.key is None and not alive
    assert events == [("open", 0), ("close", "engine 0"), ("open", 1), ("close", "engine 1"),
                      ("open", 0), ("close", "engine 0")]


def test_one_at_a_time_forgets_an_object_that_failed_to_open():
    def open_(key):
        if key == 1:
            raise UserError("cannot deserialize")
        return key

    closed = []
    loaded = OneAtATime(open_, closed.append)
    loaded.get(0)
    with pytest.raises(UserError):
        loaded.get(1)
    assert closed == [0] and loaded.key is None


def test_drift_is_the_max_over_engines_and_batches():
    x = np.ones((2, 3, 4, 4), np.float32)
    deployed = {"out": x, "num": np.array([3, 3], np.int32)}
    drift = MarkingDrift()
    assert drift.largest is None
    assert drift.add("a", "batch1", {"out": x * 1.01, "num": deployed["num"]}, deployed) == \
        pytest.approx(0.01)
    drift.add("b", "batch1", {"out": x * 1.05}, deployed)
    drift.add("c", "batch1", {"out": x}, deployed)
    assert drift.largest == pytest.approx(0.05)
    assert drift.seen("batch1") == {"a", "b", "c"} and drift.seen("batch2") == set()
    # per output, the debug engine's value furthest from the deployed one on these inputs
    assert set(drift.worst_outputs("batch1")) == {"out"}
    assert relative_l2(drift.worst_outputs("batch1")["out"], x) == pytest.approx(0.05)
    drift.add("a", "batch2", {"out": x * 1.2}, deployed)  # a later batch moves "a" more
    assert drift.by_engine == pytest.approx({"a": 0.2, "b": 0.05, "c": 0.0})
    assert drift.largest == pytest.approx(0.2)
    assert drift.worst_outputs("batch1") == {} and drift.seen("batch2") == {"a"}
    assert relative_l2(x[:1], x) == float("inf")


def test_split_marking_takes_first_outputs_and_the_plugin_inputs_at_the_tail(tmp_path):
    import onnx

    nodes = list(onnx.load(str(chain_onnx(tmp_path / "m.onnx", 5, nms=True))).graph.node)
    producers = ["/head/boxes/Relu", "/head/scores/Sigmoid"]
    layers = [layer_name(i) for i in range(5)]
    assert split_marking(nodes, layers + producers) == (
        [layer_tensor(i) for i in range(5)], [BOXES, SCORES])
    # a producer that is also a layer: once among the layers, and the plugin's inputs apart
    assert split_marking(nodes, layers + ["/head/boxes/Relu"] + producers) == (
        [layer_tensor(i) for i in range(5)] + [BOXES], [BOXES, SCORES])
    assert split_marking(nodes, producers) == ([], [BOXES, SCORES])  # layer diff off
    assert split_marking(nodes, layers) == ([layer_tensor(i) for i in range(5)], [])
    with pytest.raises(UserError, match="no ONNX node named '/missing'"):
        split_marking(nodes, ["/missing"])


# -- ChunkedDebugEngines over build_engine with the fake TensorRT --------------------------------

def deployed_engine(tmp_path: Path, layers: int, nms: bool = False) -> FakeDeployed:
    onnx_path = chain_onnx(tmp_path / "model.onnx", layers, nms=nms)
    tensorrt_build.build_engine(onnx_path, tmp_path / "model.engine", precision="fp16",
                                tf32=True, workspace_gb=2.0)
    return FakeDeployed(tmp_path / "model.engine")


@pytest.mark.parametrize("layers, chunk", [(10, 4), (8, 4), (3, 32)])
def test_layers_in_chunks_build_once_each_with_exactly_their_chunk_marked(
        monkeypatch, tmp_path, layers, chunk):
    builds = use_fake_trt(monkeypatch)
    deployed = deployed_engine(tmp_path, layers)
    builds.clear()
    opener = FakeDebugEngines()
    tensors = [layer_tensor(i) for i in range(layers)]
    engines = ChunkedDebugEngines(deployed, deployed.sidecar.onnx_path, tensors,
                                  work_dir=tmp_path / "work", chunk=chunk, open_engine=opener)
    engines.load()
    expected = [tensors[i:i + chunk] for i in range(0, layers, chunk)]
    assert len(builds) == math.ceil(layers / chunk) and builds == expected
    assert [s.tensors for s in engines.sets] == [tuple(c) for c in expected]
    assert opener.opened == []  # building loads nothing
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    for batch in (x, x[:1] * 2):
        # the layer diff's own chunks (64 by default) do not line up with the engines'
        for start in range(0, layers, 3):
            names = tensors[start:start + 3]
            got = engines.intermediates(batch, names)
            assert list(got) == names
            for n in names:
                np.testing.assert_array_equal(got[n], tensor_value(n, batch))
    assert len(builds) == math.ceil(layers / chunk)  # the second batch built nothing
    assert opener.most_alive == 1
    # a second compare run over the same work dir finds every engine on disk
    again = ChunkedDebugEngines(deployed, deployed.sidecar.onnx_path, tensors,
                                work_dir=tmp_path / "work", chunk=chunk,
                                open_engine=FakeDebugEngines())
    again.load()
    assert again.built == [] and len(builds) == math.ceil(layers / chunk)
    assert all(cached_engine_found(s) for s in again.sets)


def test_debug_engines_are_built_with_the_deployed_engines_settings(monkeypatch, tmp_path):
    use_fake_trt(monkeypatch)
    deployed = deployed_engine(tmp_path, 5)
    calls = []
    engines = ChunkedDebugEngines(deployed, deployed.sidecar.onnx_path,
                                  [layer_tensor(i) for i in range(5)], work_dir=tmp_path,
                                  chunk=2, build=lambda *a, **kw: calls.append((a, kw)),
                                  open_engine=FakeDebugEngines())
    engines.load()
    assert len(calls) == 3
    (onnx_path, engine_path), options = calls[0]
    assert Path(onnx_path) == Path(deployed.sidecar.onnx_path)
    assert engine_path == engines.sets[0].path
    assert options == {"precision": "fp16", "min_batch": 1, "opt_batch": 4, "max_batch": 4,
                       "workspace_gb": 2.0, "tf32": True, "mark_tensors": [layer_tensor(0),
                                                                           layer_tensor(1)],
                       "timing_cache": tmp_path / "model.marked.timing.cache"}


def test_a_build_interrupted_before_its_sidecar_is_built_again(monkeypatch, tmp_path):
    builds = use_fake_trt(monkeypatch)
    deployed = deployed_engine(tmp_path, 4)
    tensors = [layer_tensor(i) for i in range(4)]
    engines = ChunkedDebugEngines(deployed, deployed.sidecar.onnx_path, tensors,
                                  work_dir=tmp_path / "w", chunk=2,
                                  open_engine=FakeDebugEngines())
    engines.load()
    from harness.backends.tensorrt_sidecar import sidecar_path

    sidecar_path(engines.sets[1].path).unlink()
    builds.clear()
    again = ChunkedDebugEngines(deployed, deployed.sidecar.onnx_path, tensors,
                                work_dir=tmp_path / "w", chunk=2,
                                open_engine=FakeDebugEngines())
    again.load()
    assert builds == [tensors[2:]] and again.built == [again.sets[1].path]


def test_nms_inputs_get_their_own_engine_and_drift_is_the_max_over_engines(monkeypatch,
                                                                            tmp_path):
    builds = use_fake_trt(monkeypatch)
    deployed = deployed_engine(tmp_path, 6, nms=True)
    builds.clear()
    tensors = [layer_tensor(i) for i in range(6)]
    # marking moves the final outputs by 1e-3, 4e-2, 0 and 2e-2 in the four engines
    drift = {tensors[0]: 1e-3, tensors[2]: 4e-2, BOXES: 2e-2}
    opener = FakeDebugEngines(drift)
    engines = ChunkedDebugEngines(deployed, deployed.sidecar.onnx_path, tensors,
                                  [BOXES, SCORES], work_dir=tmp_path / "w", chunk=2,
                                  open_engine=opener)
    engines.load()
    assert builds == [tensors[0:2], tensors[2:4], tensors[4:6], [BOXES, SCORES]]
    x = np.random.default_rng(1).random((4, 3, 8, 8), dtype=np.float32)
    # the compare run's order: candidates from the NMS inputs, then the layers, then infer
    cands = engines.intermediates(x, [BOXES, SCORES])
    assert list(cands) == [BOXES, SCORES]
    assert opener.opened[-1] == engines.sets[3].path
    engines.intermediates(x, tensors)
    assert opener.opened == [s.path for s in engines.sets[3:]] + \
        [s.path for s in engines.sets[:3]]
    assert engines.marking_changed_outputs_rel_l2 == pytest.approx(4e-2)
    assert engines.drift.by_engine == pytest.approx(
        {"layers 1-2 of 6": 1e-3, "layers 3-4 of 6": 4e-2, "layers 5-6 of 6": 0.0,
         NMS_INPUTS: 2e-2}, rel=1e-4)  # the outputs are float32
    # compare.py's figure, from infer(): the same largest drift, with no engine run again
    runs = len(opener.opened)
    outputs = deployed.infer(x)
    marked = engines.infer(x)
    figure = max(relative_l2(marked[k], v) for k, v in outputs.items()
                 if k in marked and np.issubdtype(v.dtype, np.floating))
    assert figure == pytest.approx(4e-2) and len(opener.opened) == runs
    assert deployed.runs == 2  # once per batch inside, once here
    assert opener.most_alive == 1
    info = engines.describe()
    assert [e["label"] for e in info["debug_engines"]] == [s.label for s in engines.sets]
    assert info["marking_changed_outputs_rel_l2"] == pytest.approx(4e-2)
    engines.close()
    assert opener.alive == []


def test_infer_runs_the_engines_not_yet_run_on_those_inputs(monkeypatch, tmp_path):
    use_fake_trt(monkeypatch)
    deployed = deployed_engine(tmp_path, 4)
    tensors = [layer_tensor(i) for i in range(4)]
    opener = FakeDebugEngines({tensors[2]: 0.1})
    engines = ChunkedDebugEngines(deployed, deployed.sidecar.onnx_path, tensors,
                                  work_dir=tmp_path, chunk=2, open_engine=opener)
    x = np.ones((1, 3, 8, 8), np.float32)
    engines.intermediates(x, tensors[:2])  # only the first engine ran on x
    marked = engines.infer(x)
    assert relative_l2(marked["out"], final_outputs(["out"], x)["out"]) == pytest.approx(0.1)
    assert opener.opened == [engines.sets[0].path, engines.sets[1].path]


def test_a_name_outside_the_plan_is_refused(monkeypatch, tmp_path):
    use_fake_trt(monkeypatch)
    deployed = deployed_engine(tmp_path, 2)
    engines = ChunkedDebugEngines(deployed, deployed.sidecar.onnx_path, [layer_tensor(0)],
                                  work_dir=tmp_path, open_engine=FakeDebugEngines())
    with pytest.raises(UserError, match="no debug engine marks"):
        engines.intermediates(np.ones((1, 3, 8, 8), np.float32), [layer_tensor(1)])
    assert engines.intermediate_names() == [layer_tensor(0)]


# -- the pieces in build_engine and TensorRTBackend ---------------------------------------------

def test_build_marks_exactly_the_tensors_given_and_records_them(monkeypatch, tmp_path):
    builds = use_fake_trt(monkeypatch)
    onnx_path = chain_onnx(tmp_path / "m.onnx", 4)
    wanted = [layer_tensor(2), layer_tensor(0), "out"]
    result = tensorrt_build.build_engine(onnx_path, tmp_path / "d.engine",
                                         mark_tensors=wanted)
    assert builds == [[layer_tensor(2), layer_tensor(0)]]  # "out" is an output already
    assert result.sidecar.build["requested"] == wanted
    assert result.sidecar.build["layer_tensors"] == wanted


def test_build_refuses_an_unknown_tensor_before_tensorrt(monkeypatch, tmp_path):
    monkeypatch.setattr(tensorrt_build, "import_tensorrt",
                        lambda: pytest.fail("tensorrt looked up before the names were checked"))
    with pytest.raises(UserError, match=r"no node output named '/nope' \(and 1 more\)"):
        tensorrt_build.build_engine(chain_onnx(tmp_path / "m.onnx", 2), tmp_path / "d.engine",
                                    mark_tensors=[layer_tensor(0), "/nope", "/nada"])


def test_unload_drops_context_engine_and_runtime():
    class Held:
        pass

    backend = TensorRTBackend("unused.engine")
    context, engine, runtime, stream = Held(), Held(), Held(), Held()
    refs = [weakref.ref(o) for o in (context, engine, runtime, stream)]
    backend._context, backend._engine, backend._runtime, backend._stream = \
        context, engine, runtime, stream
    del context, engine, runtime, stream
    backend.unload()
    assert all(r() is None for r in refs)
    assert backend._engine is None and not hasattr(backend, "_context")
    backend.unload()  # nothing loaded: nothing to do
