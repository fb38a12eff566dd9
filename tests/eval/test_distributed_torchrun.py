"""`harness coco --launcher torchrun` on 2 CPU ranks (gloo) against one process on the
12-image synthetic split: the same AP, per-class AP and per-image detections; a rank killed
midway and the run resumed (by the same command, by another world size, by one process)
ends with the numbers of the uninterrupted run and computes no batch that was stored; a rank
that dies under a launcher that does not tear the others down, or hangs, makes the others
fail with one line, not hang.

On a CPU PyTorch's last bits depend on its thread count, so the one-process reference runs
with a rank's threads (cores // 2)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.eval.distributed import usable_cores
from harness.eval.store import RunStore

ROOT = Path(__file__).resolve().parents[2]
SLOW = str(Path(__file__).with_name("slow_coco.py"))
MATRIX = ["--backends", "torch", "onnxruntime", "--precisions", "fp32", "--batches", "1", "4",
          "--warmup", "0", "--runs", "2", "--no-progress", "--evaluator", "pycocotools"]
KEYS = ["torch_cpu_fp32_b1", "torch_cpu_fp32_b4", "onnxruntime_cpu_fp32_b1",
        "onnxruntime_cpu_fp32_b4"]
KILLED = "torch_cpu_fp32_b1"  # the first configuration: the one a kill lands in
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "delta_AP",
           "per_class", "images", "unreadable", "status")

pytestmark = pytest.mark.slow


def rank_threads() -> int:
    return max(1, usable_cores() // 2)


def torchrun(*args: str, nproc: int = 2, script: tuple[str, ...] = ("-m", "harness"),
             wait: bool = True, timeout: float = 240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc), *script, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def coco_args(val: Path, out: Path, *extra: str) -> list[str]:
    return ["coco", str(val), "--out", str(out), *MATRIX, *extra]


def new_out(tmp: Path, reference: Path) -> Path:
    """A report folder with the reference's exported ONNX already in its cache."""
    shutil.copytree(reference / "cache" / "onnx", tmp / "cache" / "onnx")
    return tmp


def image_records(cache: Path, key: str) -> dict[Path, list[dict]]:
    """Each run file of a configuration → its whole image lines."""
    out = {}
    for path in RunStore.files_of(RunStore.path_for(cache, key)):
        data = path.read_bytes()
        lines = data[:data.rfind(b"\n") + 1].decode().splitlines()
        out[path] = [r for r in map(json.loads, lines[1:]) if r["kind"] == "image"]
    return out


def detections(cache: Path, key: str) -> dict[int, list]:
    found: dict[int, list] = {}
    for records in image_records(cache, key).values():
        for r in records:
            found.setdefault(r["image_id"], r.get("detections", r.get("unreadable")))
    return found


def rows(out: Path) -> dict[str, dict]:
    doc = json.loads((out / "results.json").read_text())["coco"]
    return {f"{r['backend']}_{r['device']}_{r['precision']}_b{r['batch']}": r
            for r in doc["rows"]}


def assert_same_as(out: Path, reference: Path) -> None:
    got, want = rows(out), rows(reference)
    assert set(got) == set(KEYS)
    for key in KEYS:
        assert got[key]["status"] == "ok", got[key]["status"]
        for m in METRICS:
            assert got[key][m] == want[key][m], (key, m)
        assert detections(out / "cache", key) == detections(reference / "cache", key), key


@pytest.fixture(scope="module")
def reference(synth_val, tmp_path_factory) -> Path:
    """One process, a rank's PyTorch threads: the numbers every distributed run must give."""
    import torch

    out = tmp_path_factory.mktemp("one_process")
    before = torch.get_num_threads()
    torch.set_num_threads(rank_threads())
    try:
        assert main(coco_args(synth_val, out)) == 0
    finally:
        torch.set_num_threads(before)
    return out


def test_two_ranks_give_the_numbers_of_one_process(synth_val, reference, tmp_path):
    out = new_out(tmp_path / "two", reference)
    done = torchrun(*coco_args(synth_val, out, "--launcher", "torchrun",
                               "--latency-per-rank", "--latency-rank", "1"))
    assert_same_as(out, reference)
    for key in KEYS:  # disjoint shards: every image in exactly one rank's file
        files = image_records(out / "cache", key)
        assert sorted(p.name for p in files) == [f"{key}.rank0.jsonl", f"{key}.rank1.jsonl"]
        ids = [r["image_id"] for records in files.values() for r in records]
        assert sorted(ids) == sorted(set(ids)) and len(ids) == 12
    doc = json.loads((out / "results.json").read_text())["coco"]
    assert doc["distributed"]["world_size"] == 2
    assert [m["threads"] for m in doc["distributed"]["ranks"]] == [rank_threads()] * 2
    b4 = doc["distributed"]["passes"]["torch_cpu_fp32_b4"]  # 3 batches: 2 on rank 0, 1 on 1
    assert [(p["computed"], p["found_stored"]) for p in b4] == [(8, 0), (4, 0)]
    for row in doc["rows"]:  # the row's latency: rank 1's device (--latency-rank 1)
        assert row["latency_device"].startswith("rank 1: cpu, host ")
        per_rank = row["latency_per_rank"]
        assert [x["rank"] for x in per_rank] == [0, 1]
        assert per_rank[1]["total_ms"] == row["latency_ms"]["total"]
    md = (out / "coco.md").read_text()
    assert "Latency timed on **rank 1: cpu" in md and "### Latency per rank" in md
    # only rank 0 reports; the other rank says one line
    assert done.stdout.count("rank 1 of 2: ") == 1 and done.stdout.count("wrote ") == 1


def worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of the worker of `rank` among the launcher's descendants."""
    todo, seen = [launcher_pid], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        todo += [int(c) for c in children]
    for pid in seen[1:]:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no worker of rank {rank} under {launcher_pid}")


def kill_rank_midway(proc: subprocess.Popen, cache: Path, rank: int,
                     sig: int = signal.SIGKILL, launcher_pid: int = 0) -> None:
    """Send `sig` to the worker of `rank` once its file of the first configuration holds a
    batch (the run is slowed down by slow_coco.py, so it is midway then)."""
    path = RunStore.path_for(cache, KILLED, rank)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file() and any(image_records(cache, KILLED).get(path, [])):
            os.kill(worker_pid(launcher_pid or proc.pid, rank), sig)
            return
        time.sleep(0.05)
    raise AssertionError(f"the run ended before rank {rank} was killed: "
                         f"{proc.stderr.read().decode()[-3000:] if proc.stderr else ''}")


def killed_run(val: Path, out: Path) -> dict[str, set[int]]:
    """A 2-rank run slowed down, rank 1 SIGKILLed midway (torchrun then stops rank 0):
    the ids each configuration had stored when everything had stopped."""
    proc = torchrun(*coco_args(val, out, "--launcher", "torchrun"), script=(SLOW, "0.4"),
                    wait=False)
    try:
        kill_rank_midway(proc, out / "cache", rank=1)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    stored = {k: set(detections(out / "cache", k)) for k in KEYS}
    assert 0 < len(stored[KILLED]) < 12
    return stored


def computed(out: Path) -> dict[str, int]:
    passes = json.loads((out / "results.json").read_text())["coco"]["distributed"]["passes"]
    return {k: sum(p["computed"] for p in v) for k, v in passes.items()}


def test_kill_a_rank_then_rerun_the_command(synth_val, reference, tmp_path):
    out = new_out(tmp_path / "killed", reference)
    stored = killed_run(synth_val, out)
    before = {p: p.read_bytes() for p in (out / "cache" / "runs").glob("*.jsonl")}
    torchrun(*coco_args(synth_val, out, "--launcher", "torchrun"))
    assert_same_as(out, reference)
    # nothing stored before the kill was computed again, nothing was lost
    assert computed(out) == {k: 12 - len(stored[k]) for k in KEYS}
    for path, data in before.items():
        whole = data[:data.rfind(b"\n") + 1]
        assert path.read_bytes().startswith(whole), path.name


def test_resume_with_another_world_size_then_one_process(synth_val, reference, tmp_path):
    import torch

    from harness.eval.runner import run_coco
    from harness.settings import coco_settings

    out = new_out(tmp_path / "resized", reference)
    stored = killed_run(synth_val, out)
    torchrun(*coco_args(synth_val, out, "--launcher", "torchrun"), nproc=3)
    assert_same_as(out, reference)
    assert computed(out) == {k: 12 - len(stored[k]) for k in KEYS}
    assert sorted(p.name for p in image_records(out / "cache", KILLED)) == \
        [f"{KILLED}.rank{r}.jsonl" for r in range(3)]
    # one process afterwards: every rank's file is read, nothing is computed
    settings = coco_settings(images=synth_val, out=out, backends=["torch", "onnxruntime"],
                             precisions=["fp32"], batches=[1, 4], warmup=0, runs=2,
                             progress=False, evaluator="pycocotools")
    threads = torch.get_num_threads()
    torch.set_num_threads(rank_threads())
    try:
        doc, runs = run_coco(settings, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    assert [(r.pass_times.images, r.pass_times.skipped) for r in runs] == [(0, 12)] * 4
    want = rows(reference)
    for row in doc.to_json()["rows"]:
        key = f"{row['backend']}_{row['device']}_{row['precision']}_b{row['batch']}"
        for m in METRICS:
            assert row[m] == want[key][m], (key, m)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plain_ranks(val: Path, out: Path, timeout_s: int) -> list[subprocess.Popen]:
    """Two ranks started the way a launcher that never tears workers down would."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [sys.executable, SLOW, "0.4", *coco_args(val, out, "--launcher", "torchrun",
                                                      "--dist-timeout", str(timeout_s))],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_stops_the_other_with_one_line(synth_val, reference,
                                                                 tmp_path, fault):
    out = new_out(tmp_path / fault, reference)
    timeout_s = 20 if fault == "hangs" else 600  # death is noticed without the timeout
    rank0, rank1 = plain_ranks(synth_val, out, timeout_s)
    try:
        kill_rank_midway(rank0, out / "cache", rank=1, launcher_pid=os.getpid(),
                         sig=signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
        struck = time.monotonic()
        _, err = rank0.communicate(timeout=timeout_s + 90)
        waited = time.monotonic() - struck
    finally:
        for p in (rank0, rank1):
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait()
    lines = err.decode().strip().splitlines()
    assert rank0.returncode == 1, err.decode()[-3000:]
    assert lines[-1].startswith("harness coco: error: rank 0 of 2 lost the other ranks "
                                "while "), lines[-1]
    assert "run the same command again to resume" in lines[-1]
    if fault == "dies":
        assert waited < 60
    # what rank 0 stored is whole: its shard of the first configuration
    mine = image_records(out / "cache", KILLED)[RunStore.path_for(out / "cache", KILLED, 0)]
    assert [r["image_id"] for r in mine] == sorted({r["image_id"] for r in mine})
    assert len(mine) == 6  # batches 0, 2, ..., 10 of 12 at batch 1
