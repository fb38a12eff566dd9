"""How `harness coco`'s accuracy pass scales over GPUs under torchrun.

It runs the same matrix (the fixture; torch and onnxruntime, fp32, batch 4) once per world
size, each by launching `torchrun --standalone --nproc_per_node N -m harness coco ...
--launcher torchrun` into a fresh report folder (nothing resumed), and prints for each
configuration the accuracy pass's wall time (the slowest rank's pass: the ranks start it
together), the ratio to one GPU, and whether AP and per-class AP are equal across the world
sizes (they must be: every rank runs the batches one process runs). Latency is timed on rank
0 only and is no part of the figure; nor are start-up, model load and export.

Recipe, on the GPU machine (2 GPUs; torchrun is in PyTorch):
    python experiments/bench_distributed.py --device cuda --count 2000
Here (CPU, 2 cores: the ranks share them, so a speed-up here is one process's threads
overlapping better as two, not more hardware; and PyTorch CPU's last bits follow the thread
count, 2 for one rank and 1 each for two, so the APs may differ by a hair):
    python experiments/bench_distributed.py --device cpu --count 64
NVLink multicast stays off in every launched process (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1, unless already set); the ranks
talk over gloo anyway. Exit status 1 when the APs differ or a configuration failed (one
that is not available here, e.g. onnxruntime without its CUDA provider, is only shown).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=Path, default=None,
                   help="COCO split folder (default: a synthetic split of --count val images, "
                        "generated once under --work)")
    p.add_argument("--count", type=int, default=1000,
                   help="images evaluated (the first N by id; with a generated split, its size)")
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--worlds", nargs="+", type=int, default=[1, 2],
                   help="processes (GPUs) per run; the first is the baseline")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the split and the reports (default: a temporary one, "
                        "removed at the end)")
    return p.parse_args()


def split_folder(args: argparse.Namespace, work: Path) -> Path:
    if args.images is not None:
        return args.images
    from harness.synth import generate_synthetic_coco

    out = work / f"synth{args.count}"
    if not (out / "annotations" / "instances_val2017.json").is_file():  # >= count val images
        generate_synthetic_coco(out, images=math.ceil(args.count / 0.9) + 1, seed=7,
                                val_fraction=0.9)
    return out / "val2017"


def launch(world: int, images: Path, out: Path, args: argparse.Namespace) -> float:
    """One torchrun run into `out`; its wall time in seconds (start-up included)."""
    env = dict(os.environ)
    for key, value in MULTICAST_OFF.items():
        env.setdefault(key, value)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(world), "-m", "harness", "coco", str(images),
           "--count", str(args.count), "--backends", *args.backends, "--precisions", "fp32",
           "--batches", str(args.batch), "--devices", args.device, "--warmup", "2",
           "--runs", "10", "--no-progress", "--out", str(out), "--launcher", "torchrun"]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1) or not (out / "results.json").is_file():
        sys.exit(f"torchrun --nproc_per_node {world} failed ({done.returncode}):\n"
                 f"{done.stderr[-4000:]}")
    return seconds


def passes(out: Path) -> dict[str, dict]:
    """configuration → {AP, per_class, status, pass_s (slowest rank), computed, ranks}."""
    coco = json.loads((out / "results.json").read_text())["coco"]
    by_key = coco["distributed"]["passes"]
    found = {}
    for row in coco["rows"]:
        key = f"{row['backend']}_{row['device']}_{row['precision']}_b{row['batch']}"
        if key not in by_key and f"{key}_pre{row['nms_pre']}" in by_key:  # an nms_pre axis
            key = f"{key}_pre{row['nms_pre']}"
        ranks = by_key.get(key) or []
        found[key] = {"status": row["status"], "AP": row["AP"], "per_class": row["per_class"],
                      "pass_s": max((p["wall_s"] for p in ranks), default=None),
                      "computed": sum(p["computed"] for p in ranks), "ranks": len(ranks)}
    return found


def main() -> int:
    args = parse()
    if args.device == "cuda":
        import torch

        have = torch.cuda.device_count()
        if max(args.worlds) > have:
            sys.exit(f"--worlds {max(args.worlds)} needs that many GPUs; {have} visible")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        images = split_folder(args, work)
        results, walls = {}, {}
        onnx = None
        for world in args.worlds:
            out = work / f"world{world}"
            shutil.rmtree(out, ignore_errors=True)
            if onnx is not None:  # export once: the first run's files are reused
                shutil.copytree(onnx, out / "cache" / "onnx")
            walls[world] = launch(world, images, out, args)
            results[world] = passes(out)
            onnx = onnx or (out / "cache" / "onnx")
            print(f"world {world}: torchrun took {walls[world]:.1f} s in all", flush=True)
        return report(results, args)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def report(results: dict[int, dict[str, dict]], args: argparse.Namespace) -> int:
    base = args.worlds[0]
    keys = list(results[base])
    print(f"\naccuracy pass, {args.count} images, batch {args.batch}, {args.device}; wall "
          "time = the slowest rank's pass\n")
    head = " | ".join(f"{w} proc (s) | speed-up" for w in args.worlds)
    print(f"| configuration | {head} | AP | equal across worlds |")
    print("|:---|" + "---:|---:|" * len(args.worlds) + "---:|:---|")
    bad = 0
    for key in keys:
        rows = [results[w].get(key) for w in args.worlds]
        if any(r is None or r["status"] != "ok" for r in rows):  # not available here: shown
            print(f"| {key} | " + " | ".join(
                "—" if r is None else r["status"][:60] for r in rows) + " |")
            bad += any(r is None or r["status"].startswith("failed") for r in rows)
            continue
        cells = []
        for r in rows:
            ratio = rows[0]["pass_s"] / r["pass_s"] if r["pass_s"] else float("nan")
            cells.append(f"{r['pass_s']:.2f} | {ratio:.2f}x")
        same = all((r["AP"], r["per_class"]) == (rows[0]["AP"], rows[0]["per_class"])
                   for r in rows)
        whole = all(r["computed"] == rows[0]["computed"] for r in rows)
        bad += not (same and whole)
        print(f"| {key} | {' | '.join(cells)} | {rows[0]['AP']:.4f} | "
              f"{'yes' if same else 'NO'}{'' if whole else ' (images computed differ)'} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
