"""The pieces of a distributed `harness coco` that need no second process: torchrun's
environment read into Ranks (and refused in one line), the shard of every world size over
what is stored, the run files of every rank read as one store, what the ranks agree on, and
rank 0 merging records it cannot see on its disk."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.cli import main
from harness.errors import UserError
from harness.eval.coco_pass import plan_batches
from harness.eval.distributed import (
    Ranks, agree, first_problem, merge_records, ranks_from_env, store_view,
)
from harness.eval.store import RunStore

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
HEADER = {"configuration": "torch_cpu_fp32_b2", "model": {"sha": "x"}}


# -- torchrun's environment -------------------------------------------------------------------

def test_torchrun_environment_gives_the_rank_and_its_gpu():
    ranks = ranks_from_env("torchrun", TORCHRUN, timeout_s=60)
    assert (ranks.rank, ranks.world, ranks.local_rank, ranks.local_world) == (3, 4, 1, 2)
    assert ranks.distributed and not ranks.main and ranks.shard == (3, 4)
    assert ranks.store_rank == 3 and ranks.gpu == "1" and ranks.latency_ranks == [0]
    # the launcher's CUDA_VISIBLE_DEVICES: the rank takes its entry of the list
    ranks = ranks_from_env("torchrun", {**TORCHRUN, "CUDA_VISIBLE_DEVICES": "4,6"},
                           latency_per_rank=True)
    assert ranks.gpu == "6" and ranks.latency_ranks == [0, 1, 2, 3]
    assert ranks.where("cpu") == {"rank": 3, "host": ranks.host, "device": "cpu", "gpu": None}
    alone = ranks_from_env("none", {})
    assert (alone.rank, alone.world, alone.distributed, alone.store_rank) == (0, 1, False, None)


@pytest.mark.parametrize("launcher, env, message", [
    ("torchrun", {}, "--launcher torchrun needs torchrun's environment (RANK, WORLD_SIZE, "
                     "LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set): run it under torchrun "
                     "--nproc_per_node N -m harness coco ..."),
    ("none", {"WORLD_SIZE": "2"}, "started by a launcher (WORLD_SIZE=2) with --launcher none"),
    ("torchrun", {**TORCHRUN, "CUDA_VISIBLE_DEVICES": "0"}, "rank 3 has no GPU: it is local "
                                                            "rank 1 but CUDA_VISIBLE_DEVICES "
                                                            "lists 1 (0)"),
    ("mpi", {}, "unknown --launcher 'mpi'"),
])
def test_a_launcher_that_is_not_there_is_one_line(launcher, env, message):
    with pytest.raises(UserError) as err:
        ranks_from_env(launcher, env, uses_cuda=True)
    assert str(err.value).startswith(message)


def test_cpu_ranks_need_no_gpu_of_their_own():
    ranks = ranks_from_env("torchrun", {**TORCHRUN, "CUDA_VISIBLE_DEVICES": "0"})
    assert ranks.rank == 3 and ranks.where("cpu")["device"] == "cpu"


def test_latency_rank_must_be_a_rank():
    with pytest.raises(UserError, match=r"--latency-rank 4 is not a rank of this run \(0 .. 3\)"):
        ranks_from_env("torchrun", TORCHRUN, latency_rank=4)
    with pytest.raises(UserError, match="--dist-timeout must be more than 0"):
        ranks_from_env("torchrun", TORCHRUN, timeout_s=0)


def test_cli_without_torchrun_says_how_to_start_it(synth_val, tmp_path, capsys, monkeypatch):
    for key in TORCHRUN:
        monkeypatch.delenv(key, raising=False)
    code = main(["coco", str(synth_val), "--out", str(tmp_path), "--backends", "torch",
                 "--launcher", "torchrun"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("harness coco: error: --launcher torchrun needs torchrun's "
                             "environment")
    assert err[0].endswith("run it under torchrun --nproc_per_node N -m harness coco ...")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["coco", str(synth_val), "--out", str(tmp_path), "--backends", "torch"]) == 2
    assert "add --launcher torchrun" in capsys.readouterr().err


# -- shards over what is stored ------------------------------------------------------------

def shards(image_ids: list[int], batch: int, world: int, stored: set[int]) -> list[list[list]]:
    """Per rank, the batches it computes (coco_pass.run_pass's rule: batch k on rank
    k % world, a batch all of whose images are stored is skipped)."""
    batches = plan_batches(image_ids, batch)
    return [[b for k, b in enumerate(batches) if k % world == rank
             and not all(i in stored for i in b)] for rank in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_every_world_size_runs_each_missing_batch_once_as_one_process_would(world):
    ids = list(range(100, 123))  # 23 images at batch 4: the last batch holds 3
    stored = set(ids[4:8]) | set(ids[16:20]) | {ids[0]}  # two whole batches, one image
    alone = shards(ids, 4, 1, stored)[0]
    mine = shards(ids, 4, world, stored)
    flat = [b for rank in mine for b in rank]
    assert sorted(flat) == sorted(alone)  # the very batches of one process, none twice
    assert not any(all(i in stored for i in b) for b in flat)  # nothing stored again
    assert [ids[0], ids[1], ids[2], ids[3]] in flat  # a batch half stored is run whole


# -- every rank's file, one store --------------------------------------------------------------

def write_run_file(path: Path, header: dict, records: list[dict], tail: bytes = b"") -> None:
    lines = [{"kind": "header", "format": 1, **header}, *records]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(json.dumps(r) + "\n" for r in lines).encode() + tail)


def image(i: int, **extra) -> dict:
    return {"kind": "image", "image_id": i, "file": f"{i}.jpg",
            "detections": [{"image_id": i, "score": 0.5}], **extra}


def test_a_rank_reads_every_file_of_its_configuration(tmp_path):
    key = HEADER["configuration"]
    runs = tmp_path / "runs"
    write_run_file(runs / f"{key}.rank0.jsonl", HEADER, [image(1), image(2)])
    torn = b'{"kind":"image","image_id":9'
    write_run_file(runs / f"{key}.rank1.jsonl", HEADER,
                   [image(3), {"kind": "latency", "result": {"runs": 2},
                               "measured_on": {"host": "a", "device": "cuda:1"}}], torn)
    write_run_file(runs / f"{key}.jsonl", HEADER, [image(4, unreadable="broken")])
    write_run_file(runs / f"{key}.rank3.jsonl", {**HEADER, "model": {"sha": "other"}},
                   [image(5)])  # another model's: not read, not moved
    write_run_file(runs / "torch_cpu_fp32_b20.rank0.jsonl", HEADER, [image(6)])  # another key
    assert [p.name for p in RunStore.files_of(RunStore.path_for(tmp_path, key, 2))] == [
        f"{key}.jsonl", f"{key}.rank0.jsonl", f"{key}.rank1.jsonl", f"{key}.rank3.jsonl"]

    store = RunStore(RunStore.path_for(tmp_path, key, 2), HEADER).open()  # world 3 now
    assert sorted(store.images) == [1, 2, 3, 4] and store.resumed
    assert store.unreadable() == {4: "broken"}
    assert store.latency is None and store.latency_records() == [
        ({"runs": 2}, {"host": "a", "device": "cuda:1"}, False)]
    # another rank's file is only read: its torn line is left to its writer
    assert (runs / f"{key}.rank1.jsonl").read_bytes().endswith(torn)
    assert (runs / f"{key}.rank3.jsonl").is_file()
    assert not list(runs.glob("*.stale"))
    # this rank writes its own file only, and never an image some file holds
    store.append_images([image(2), image(7)])
    assert [json.loads(x)["image_id"] for x in
            (runs / f"{key}.rank2.jsonl").read_text().splitlines()[1:]] == [7]
    store.elsewhere = {8}  # done on another host's disk
    assert store.done(8) and store.done(1) and not store.done(9)
    # what another rank wrote since is picked up by read_beside (rank 0 merging)
    write_run_file(runs / f"{key}.rank1.jsonl", HEADER, [image(3), image(9)])
    assert store.read_beside() == 1 and 9 in store.images


def test_one_process_after_a_distributed_run_reads_the_rank_files(tmp_path):
    key = HEADER["configuration"]
    write_run_file(RunStore.path_for(tmp_path, key, 0), HEADER, [image(1)])
    write_run_file(RunStore.path_for(tmp_path, key, 1), HEADER, [image(2)])
    store = RunStore(RunStore.path_for(tmp_path, key), HEADER).open()
    assert store.path.name == f"{key}.jsonl" and sorted(store.images) == [1, 2]
    assert [d["image_id"] for d in store.detections()] == [1, 2]


# -- what the ranks agree on ----------------------------------------------------------------

def test_agreement_unions_what_is_stored_and_names_a_rank_that_cannot_run():
    views = [{"problem": None, "header": HEADER, "stored": [1, 2], "reference_nms": True},
             {"problem": None, "header": HEADER, "stored": [3], "reference_nms": None}]
    agreed = agree(views)
    assert agreed.problem is None and agreed.stored == {1, 2, 3}
    assert agreed.reference_nms is True
    other = {**views[1], "header": {**HEADER, "model": {"sha": "y"}}}
    assert agree([views[0], other]).problem.startswith(
        "failed: rank 1 loaded other files or data than rank 0 (model differ)")
    down = {"problem": "not available: PyTorch here has no CUDA device"}
    assert agree([views[0], down]).problem == \
        "not available: PyTorch here has no CUDA device (on rank 1)"
    assert first_problem([down, down]) == down["problem"]  # every rank: no rank named


def test_store_view_of_a_rank(tmp_path):
    store = RunStore(tmp_path / "k.jsonl", HEADER).open()
    store.append_images([image(1, reference_nms=[]), image(2, unreadable="x")])
    view = store_view(store, [2, 1, 5], HEADER, None)
    assert view == {"problem": None, "header": HEADER, "stored": [2, 1],
                    "reference_nms": True}
    assert store_view(None, [1], None, "failed: x") == {"problem": "failed: x"}


class TwoRanksOnOneDisk:
    """merge_records' collectives as rank 0 sees them, the other rank answering from
    `other` (its store on another host's disk)."""

    def __init__(self, other: RunStore):
        self.main, self.other, self.missing = True, other, None

    def broadcast(self, value, what):
        self.missing = value
        return value

    def gather(self, value, what):
        return [value, [self.other.images[i] for i in self.missing if i in self.other.images]]


def test_rank_0_gets_and_keeps_the_records_it_cannot_see(tmp_path):
    key = HEADER["configuration"]
    mine = RunStore(RunStore.path_for(tmp_path / "a", key, 0), HEADER).open()
    mine.append_images([image(1)])
    theirs = RunStore(RunStore.path_for(tmp_path / "b", key, 1), HEADER).open()
    theirs.append_images([image(2), image(3)])
    merge_records(TwoRanksOnOneDisk(theirs), mine, [1, 2, 3], "merging")
    assert sorted(mine.images) == [1, 2, 3]
    # written into rank 0's own file: a later run on this host finds them
    again = RunStore(mine.path, HEADER).open()
    assert sorted(again.images) == [1, 2, 3]
    lost = RunStore(RunStore.path_for(tmp_path / "c", key, 0), HEADER).open()
    with pytest.raises(UserError, match="1 images stored as done are in no rank's run file"):
        merge_records(TwoRanksOnOneDisk(theirs), lost, [2, 4], "merging")


def test_one_process_needs_no_collective():
    alone = Ranks()
    assert alone.all_gather(5, "x") == [5] and alone.broadcast(6, "x") == 6
    assert alone.gather(7, "x") == [7] and alone.in_turn(lambda: 8, "x") == 8
    assert alone.take_turns([0], lambda: 9, "x") == {0: 9}
    alone.barrier("x")


# -- the report says where latency was timed ----------------------------------------------------

def test_coco_md_names_the_latency_device():
    from harness.report.coco_ranks import latency_device_text, ranks_sections

    row = SimpleNamespace(ok=True, backend="torch", device="cuda", precision="fp32", batch=4,
                          latency_device="rank 0: cuda:0 (NVIDIA H200), host a",
                          latency_per_rank=[
                              {"rank": 0, "device": "cuda:0", "gpu": "H200", "host": "a",
                               "inference_ms": {"median": 2.0}, "total_ms": {"median": 9.0},
                               "compute_ms": {"median": 1.5}, "images_per_s": 400.0,
                               "stable": True},
                              {"rank": 1, "device": "cuda:1", "gpu": "H200", "host": "a",
                               "inference_ms": {"median": 2.2}, "total_ms": {"median": 9.5},
                               "compute_ms": {"median": 1.6}, "images_per_s": 390.0,
                               "stable": True}])
    cpu = SimpleNamespace(**{**vars(row), "device": "cpu", "latency_per_rank": None,
                             "latency_device": "rank 0: cpu, host a"})
    doc = SimpleNamespace(rows=[row, cpu], distributed={
        "world_size": 2, "launcher": "torchrun", "backend": "gloo",
        "ranks": [{"rank": 0, "host": "a"}, {"rank": 1, "host": "a"}],
        "passes": {"torch_cuda_fp32_b4": [
            {"rank": 0, "computed": 8, "found_stored": 0, "wall_s": 1.5},
            {"rank": 1, "computed": 4, "found_stored": 4, "wall_s": 0.75}]}})
    text = latency_device_text(doc)
    assert text.startswith("Latency timed on **rank 0: cuda:0 (NVIDIA H200), host a**: torch "
                           "cuda fp32 b4; **rank 0: cpu, host a**: torch cpu fp32 b4.")
    assert "not averaged" in text
    md = "\n".join(ranks_sections(doc))
    assert "| torch_cuda_fp32_b4 | 8 + 0, 4 + 4 | 1.5, 0.750 | 1.5 |" in md
    assert "| torch cuda fp32 b4 | 0 | cuda:0 (H200) | a | 2 | 1.5 | 9 | 400 | yes | 10.0% |" in md


def test_a_gpu_rank_gets_its_gpu_and_its_share_of_the_cores(monkeypatch):
    """prepare() narrows CUDA_VISIBLE_DEVICES to the rank's GPU; mmengine's logger (built
    with every model) indexes CUDA_VISIBLE_DEVICES by LOCAL_RANK, so LOCAL_RANK becomes 0
    (rank 1 of two failed to build the model on the two-GPU machine before)."""
    import torch
    from mmengine.logging.logger import _get_device_id

    from harness.eval.distributed import prepare, ranks_from_env

    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from harness.backends.onnxruntime_backend import OnnxruntimeBackend

    monkeypatch.setattr(OnnxruntimeBackend, "default_threads", None)
    threads = torch.get_num_threads()
    try:
        ranks = prepare(ranks_from_env("torchrun", dict(env), uses_cuda=True), uses_cuda=True)
        assert ranks.gpu == "1" and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
        assert os.environ["LOCAL_RANK"] == "0"
        assert _get_device_id() == 1  # the host's GPU 1, named without an IndexError
        # onnxruntime sessions take the rank's share of the host's cores, not every core
        from harness.eval.distributed import usable_cores

        share = max(1, usable_cores() // 2)
        assert OnnxruntimeBackend.default_threads == share == int(os.environ["OMP_NUM_THREADS"])
        assert OnnxruntimeBackend("x.onnx").threads == share
        assert OnnxruntimeBackend("x.onnx", threads=3).threads == 3
    finally:
        torch.set_num_threads(threads)
