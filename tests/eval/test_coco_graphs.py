"""The fast post-processing as graphs (harness.eval.coco_graphs): the reference kernel's
detections element for element whatever the graph's path — captured once and replayed, a
call of fewer images than the graph holds, redone with more capacity, continued where its
rounds do not converge, left to the eager path where its matrices would not fit — on the CPU
with the stand-in that runs the captured function again at each replay, and on a GPU with
CUDA graphs (skipped without one)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.nms.test_fast_mmyolo import assert_same  # noqa: E402


@dataclass
class Image:
    path: object
    image_id: int
    file_name: str


@pytest.fixture(scope="module")
def fixture_batches(tmp_path_factory):
    """The fixture model, and batches of 4 synthetic images: (metas, raw outputs as
    numpy, decoded outputs as numpy, the reference's detections)."""
    from harness.eval.coco_pass import plan_batches, prepare_batch
    from harness.eval.coco_post import make_post
    from harness.models.mmyolo import flat_head_outputs, load_mmyolo_model
    from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG
    from tests.conftest import synth_val_images

    model = load_mmyolo_model(FIXTURE_CONFIG, FIXTURE_CHECKPOINT)
    paths = synth_val_images(tmp_path_factory, "graphs", 24, seed=6)
    reference, _ = make_post(model, "cpu", "reference")
    batches = []
    for chunk in plan_batches([Image(p, i, p.name) for i, p in enumerate(paths)], 4):
        p = prepare_batch(chunk, model.preprocess)
        with torch.no_grad():
            raw = flat_head_outputs(model.raw_outputs(torch.from_numpy(p.inputs)))
            decoded = model.decoded_outputs(raw)
        outputs = {k: v.numpy() for k, v in raw.items()}
        batches.append((p.metas, outputs, {k: v.numpy() for k, v in decoded.items()},
                        reference(outputs, p.metas)))
    return model, batches


def inputs_of(outputs):
    from harness.eval.coco_post import graph_inputs

    return graph_inputs(outputs)


def test_replays_give_the_reference_detections_and_capture_once(fixture_batches):
    from harness.eval.coco_graphs import GraphedPost

    model, batches = fixture_batches
    graphs = GraphedPost(model, "cpu")
    kept = 0
    for metas, outputs, decoded, refs in batches:
        for found in (graphs(inputs_of(outputs), metas), graphs(inputs_of(decoded), metas)):
            assert found is not None, graphs.describe()
            for r, f in zip(refs, found):
                assert_same(r, f, "graph replay")
                kept += len(r)
    assert kept > 100
    # per batch size one graph for the head's maps, one for decoded candidates; every call
    # one replay
    sizes = {len(metas) for metas, *_ in batches}
    assert len(batches) > len(sizes), "a batch shape must come back to be replayed"
    assert graphs.stats["captures"] == 2 * len(sizes), graphs.describe()
    assert graphs.stats["replays"] == 2 * len(batches), graphs.describe()
    # what results.json keeps of it
    from harness.eval.coco_post import post_record

    fast = lambda outputs, metas: None  # noqa: E731 — a post carrying these graphs
    fast.graphs = graphs
    record = post_record(fast, "fast (batched torch on cuda, CUDA graphs)")
    assert record["graphs"] == {"captures": 2 * len(sizes), "replays": 2 * len(batches),
                                "redone": 0, "continued": 0, "eager": 0,
                                "capture_s": record["graphs"]["capture_s"]}
    assert record["graphs"]["capture_s"] > 0
    assert graphs.stats["eager"] == 0 and not graphs.failed
    # the slowest and the last call, in their parts (benchmarks print where a call's time went)
    for total, parts in (graphs.slowest, graphs.last):
        assert set(parts) == {"lock", "inputs", "replay", "results"}
        assert 0 < sum(parts.values()) <= total + 1e-9
    assert graphs.slowest[0] >= graphs.last[0]
    assert graphs.describe_calls().startswith("slowest call ")


def test_a_capacity_too_small_is_redone_larger_and_remembered(fixture_batches, monkeypatch):
    import harness.eval.coco_graphs as cg

    model, batches = fixture_batches
    monkeypatch.setattr(cg, "K_START", 16)
    monkeypatch.setattr(cg, "K_STEP", 64)
    graphs = cg.GraphedPost(model, "cpu")
    for metas, outputs, _, refs in batches:
        for r, f in zip(refs, graphs(inputs_of(outputs), metas)):
            assert_same(r, f, "redone with more capacity")
    assert graphs.stats["redone"] >= 1
    assert graphs.k_caps and all(k % 64 == 0 and k > 16 for k in graphs.k_caps.values())
    redone = graphs.stats["redone"]
    metas, outputs, _, _ = batches[0]
    graphs(inputs_of(outputs), metas)
    assert graphs.stats["redone"] == redone, "the capacity found is kept for the shapes"


def test_fewer_images_than_the_graph_holds_are_padded_not_captured_again(fixture_batches):
    """A graph holds a power of two of images up to 8, then a multiple of 8: 3 images replay
    the graph of 4 (the fourth a padding image without candidates), 2 and 1 get graphs of
    their own."""
    from harness.eval.coco_graphs import GraphedPost, graph_batch

    assert [graph_batch(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 24, 25)] == \
        [1, 2, 4, 4, 8, 8, 16, 16, 24, 24, 32]
    model, batches = fixture_batches
    metas, outputs, _, refs = batches[0]
    graphs = GraphedPost(model, "cpu")
    for n, captures in [(4, 1), (3, 1), (2, 2), (1, 3), (3, 3)]:
        given = {name: value[:n] for name, value in inputs_of(outputs).items()}
        found = graphs(given, metas[:n])
        assert len(found) == n and graphs.stats["captures"] == captures, (n, graphs.describe())
        for r, f in zip(refs[:n], found):
            assert_same(r, f, f"{n} images in a graph of {graph_batch(n)}")


def test_rounds_that_do_not_converge_go_on_and_matrices_too_large_go_eager(fixture_batches):
    from harness.eval.coco_graphs import GraphedPost
    from harness.eval.coco_post import fast_detections

    model, batches = fixture_batches
    metas, outputs, _, refs = batches[0]
    graphs = GraphedPost(model, "cpu")
    graphs.rounds = 1
    found = graphs(inputs_of(outputs), metas)  # continued from the graph's one round
    assert graphs.stats["continued"] == 1 and graphs.stats["eager"] == 0
    for r, f in zip(refs, found):
        assert_same(r, f, "unconverged, then continued")
    small = GraphedPost(model, "cpu", budget_bytes=32 * 64 ** 2)
    assert small(inputs_of(outputs), metas) is None and small.stats["captures"] == 0
    for r, f in zip(refs, fast_detections(model, outputs, metas, "cpu", graphs=small)):
        assert_same(r, f, "too large for a graph, then eager")


def test_calls_from_many_threads_stage_their_own_inputs(fixture_batches):
    """Calls made side by side (a pass's post-processing threads) each copy their inputs into
    a staging buffer of their own outside the graph's lock: every call still gets its own
    batch's reference detections, and the buffers all come back, no more of them than calls
    ran at once."""
    from concurrent.futures import ThreadPoolExecutor

    from harness.eval.coco_graphs import GraphedPost

    class SlowLock:  # every call waits a little before the lock: the others stage meanwhile
        def __init__(self):
            self.inner = threading.Lock()

        def __enter__(self):
            time.sleep(0.005)
            self.inner.acquire()

        def __exit__(self, *exc):
            self.inner.release()

    model, batches = fixture_batches
    graphs = GraphedPost(model, "cpu")
    graphs.lock = SlowLock()
    work = [(k, which) for k in range(len(batches)) for which in (1, 2)] * 3

    def call(job):
        k, which = job
        metas, refs = batches[k][0], batches[k][3]
        return k, graphs(inputs_of(batches[k][which]), metas), refs

    with ThreadPoolExecutor(6) as pool:
        done = list(pool.map(call, work))
    for k, found, refs in done:
        assert found is not None and len(found) == len(refs), graphs.describe()
        for r, f in zip(refs, found):
            assert_same(r, f, f"batch {k}, called beside 5 other threads")
    assert graphs.stats["replays"] == len(work)
    made = sum(len(free) for free in graphs.staging.values())
    assert len(graphs.staging) == 2 * len({len(b[0]) for b in batches})  # maps, decoded
    assert len(graphs.staging) < made <= 6 * len(graphs.staging)  # calls did overlap
    assert set(graphs.last[1]) == {"inputs", "lock", "replay", "results"}


def test_prepared_calls_find_their_staging_buffers_made(fixture_batches):
    """prepare(calls) (a pass's warm-up, with its post workers): the first call of new
    shapes makes that many staging buffers at once; calls side by side afterwards make no
    more; the detections are the reference's."""
    from harness.eval.coco_graphs import GraphedPost

    model, batches = fixture_batches
    metas, raw, _, refs = batches[0]
    graphs = GraphedPost(model, "cpu")
    graphs.prepare(3)
    for r, f in zip(refs, graphs(inputs_of(raw), metas)):
        assert_same(r, f, "the prepared first call")
    (shapes, free), = graphs.staging.items()
    assert len(free) == 3
    taken = [graphs._stage(shapes, inputs_of(raw), metas) for _ in range(3)]
    assert free == [] and len({id(t) for t in taken}) == 3
    unprepared = GraphedPost(model, "cpu")
    unprepared(inputs_of(raw), metas)
    assert [len(v) for v in unprepared.staging.values()] == [1]


def test_make_post_uses_graphs_on_a_gpu_only(fixture_batches):
    from harness.eval.coco_post import make_post

    model, _ = fixture_batches
    fast, how = make_post(model, "cpu", "fast")
    assert fast.graphs is None and "graphs" not in how
    assert not hasattr(fast, "prepare")  # (a graphed post's is its graphs')


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_equal_the_reference_beside_a_busy_device(fixture_batches):
    """On a GPU: host and device inputs, captured while another thread keeps launching and
    waiting for its stream (the pass's inference does, latency.cuda_sync), every replay
    what the eager path
    gives on that GPU (whose decode differs from the CPU's by an ulp here and there: CUDA's
    exp and fused multiply-adds)."""
    from harness.eval.coco_post import fast_detections, make_post
    from harness.eval.latency import cuda_sync

    model, batches = fixture_batches
    model.module.to("cuda")
    try:
        fast, how = make_post(model, "cuda", "fast")
        assert "CUDA graphs" in how
        stop = threading.Event()
        x = torch.randn(256, 256, device="cuda")

        sync = cuda_sync("cuda")
        failures = []

        def busy() -> None:
            try:
                while not stop.is_set():
                    (x @ x).sum().item()
                    sync()
            except Exception as exc:  # noqa: BLE001 — reported by the test
                failures.append(exc)

        worker = threading.Thread(target=busy, daemon=True)
        worker.start()
        try:
            for _ in range(2):
                for metas, outputs, decoded, refs in batches:
                    on_device = {k: torch.from_numpy(v).cuda() for k, v in outputs.items()}
                    for given in (outputs, decoded, on_device):
                        eager = fast_detections(model, given, metas, "cuda")
                        assert sum(len(e) for e in eager) > 10
                        for e, f, r in zip(eager, fast(given, metas), refs):
                            assert_same(e, f, "CUDA graph")
                            # and the CPU reference's, but for the decode's ulps
                            assert np.array_equal(e.labels, r.labels)
                            assert np.array_equal(e.box_index, r.box_index)
                            assert np.allclose(e.boxes, r.boxes, rtol=0, atol=1e-3)
        finally:
            stop.set()
            worker.join()
        assert not failures, failures
        graphs = fast.graphs
        assert not graphs.failed and graphs.stats["eager"] == 0, graphs.describe()
        assert graphs.stats["capture_s"] > 0
        sizes = {len(metas) for metas, *_ in batches}
        assert graphs.stats["captures"] == 2 * len(sizes), graphs.describe()
    finally:
        model.module.to("cpu")


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_a_pass_with_graphs_stores_what_the_reference_does(synth_val, tmp_path, processes,
                                                           monkeypatch):
    """The whole pass (run_pass: reading ahead in threads or processes, post-processing
    threads sharing one GraphedPost, encoders, the writer) with the fixture's real outputs:
    the graphs' post takes batches as they come (its post_group), a last batch of 2 images
    replays a graph of 2 — and the stored detections are the reference post's. (No call is
    held back for the last one: whether it would be depends on the host's speed — on the
    H200's, the second batch joined the last, a call of 6 images.)"""
    from harness.eval import coco_pass
    from harness.eval.coco_graphs import GRAPH_GROUP_IMAGES, GraphedPost
    from harness.eval.coco_pass import run_pass
    from harness.eval.coco_post import fast_detections, make_post
    from harness.eval.coco_split import open_split
    from harness.eval.store import RunStore
    from harness.models.mmyolo import flat_head_outputs, load_mmyolo_model
    from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG

    monkeypatch.setattr(coco_pass, "POST_OVERLAP_COST", 0.0)  # every call ends in time
    model = load_mmyolo_model(FIXTURE_CONFIG, FIXTURE_CHECKPOINT)
    split = open_split(synth_val, count=10)

    def infer(x, metas=None):
        with torch.no_grad():
            raw = flat_head_outputs(model.raw_outputs(torch.from_numpy(np.asarray(x))))
        return {k: v.numpy() for k, v in raw.items()}

    graphs = GraphedPost(model, "cpu")
    calls = []

    def graphed(outputs, metas):
        calls.append(len(metas))
        return fast_detections(model, outputs, metas, "cpu", graphs=graphs)

    graphed.can_join = lambda outputs: True
    graphed.post_group = GRAPH_GROUP_IMAGES
    reference, _ = make_post(model, "cpu", "reference")
    stores = {}
    for name, post in (("reference", reference), ("graphs", graphed)):
        stores[name] = RunStore(tmp_path / f"{name}.jsonl", {"configuration": name}).open()
        run_pass(split.images, 4, model.preprocess, infer, post, [1, 2, 3, 4, 5],
                 stores[name], progress=False, workers=2, processes=processes)
    assert calls and max(calls) <= GRAPH_GROUP_IMAGES, calls
    assert sorted(calls) == [2, 4, 4], "each batch as it came, the last one of 2 images"
    # one replay a call, one more for each call redone with more capacity
    assert graphs.stats["replays"] == 3 + graphs.stats["redone"], graphs.describe()
    assert graphs.stats["eager"] == 0, graphs.describe()
    ids = [im.image_id for im in split.images]
    found = stores["graphs"].detections(ids)
    assert len(found) > 50 and found == stores["reference"].detections(ids)
