"""`harness coco DATASET_SPLIT_DIR`: COCO mAP and latency of the model across backends ×
precisions × batch sizes (flags, or an experiment file with --experiment); writes `coco.md`,
`coco.csv`, `coco_ap_vs_latency.png` and the `coco` section of `results.json` into --out.
Interrupted runs resume: run the same command again. Under torchrun (`--launcher torchrun`)
every rank runs its shard of the images and rank 0 writes the report."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", type=Path, nargs="?", metavar="DATASET_SPLIT_DIR",
                   help="COCO split folder, e.g. ~/coco/val2017 (default: the experiment's "
                        "data.images)")
    p.add_argument("--ann", type=Path, default=None,
                   help="annotation file (default: ../annotations/instances_<split>.json)")
    p.add_argument("--experiment", type=Path, default=None,
                   help="experiment file (TOML); flags given here override it")
    p.add_argument("--cfg", type=Path, default=None,
                   help="mmyolo config (default: the experiment's, else the bundled fixture)")
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint for --cfg")
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help="torch onnxruntime tensorrt (default: all; missing ones are reported "
                        "as not available)")
    p.add_argument("--precisions", nargs="+", default=None, metavar="P",
                   help="fp32 fp16 bf16 int8 (default: all; each backend takes the ones it "
                        "has: torch fp32/fp16/bf16, onnxruntime and tensorrt fp32/fp16/int8)")
    p.add_argument("--batches", nargs="+", type=int, default=None, metavar="N",
                   help="batch sizes (default: 1 4)")
    p.add_argument("--devices", nargs="+", default=None, metavar="D",
                   help="cpu cuda (default: cpu); tensorrt always runs on cuda")
    p.add_argument("--count", type=int, default=None,
                   help="evaluate the first N images by id (default: every image)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed latency runs (default: GPU 50, CPU 5)")
    p.add_argument("--runs", type=int, default=None,
                   help="timed latency runs (default: GPU 1000, CPU 50)")
    p.add_argument("--calib-count", type=int, default=32,
                   help="int8 calibration images, spread over the split")
    p.add_argument("--evaluator", choices=("auto", "pycocotools", "faster-coco-eval"),
                   default="auto",
                   help="COCO evaluation (auto: faster-coco-eval when installed)")
    p.add_argument("--out", type=Path, default=None,
                   help="report folder (default reports/<experiment name>/, or reports/coco/)")
    p.add_argument("--fresh", action="store_true",
                   help="discard stored per-image results and compute everything again")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--nms-pre", type=int, nargs="+", default=None, metavar="N",
                   help="test_cfg.nms_pre for every row; several values make an axis of the "
                        "matrix and an 'AP by nms_pre' table (e.g. 30000 3840 1000)")
    p.add_argument("--preprocess", nargs="+", default=None, metavar="MODE",
                   help="fixed (every image letterboxed to the config's size) and / or "
                        "batch_shapes (mmyolo's per-batch rectangles from the config's "
                        "batch_shapes_cfg, as tools/test.py evaluates; PyTorch rows only)")
    p.add_argument("--score-thr", type=float, default=None,
                   help="test_cfg.score_thr for every row (default: the config's)")
    p.add_argument("--iou-threshold", type=float, default=None,
                   help="test_cfg.nms.iou_threshold for every row (default: the config's)")
    p.add_argument("--max-per-img", type=int, default=None,
                   help="test_cfg.max_per_img for every row (default: the config's)")
    from harness.eval.distributed import DEFAULT_TIMEOUT_S, LAUNCHERS

    p.add_argument("--launcher", choices=LAUNCHERS, default="none",
                   help="torchrun: one process per GPU, started by torchrun --nproc_per_node N "
                        "-m harness coco ... --launcher torchrun; each rank runs a shard of "
                        "the images, rank 0 merges, scores and writes the report")
    p.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help="seconds a rank waits for the others at a synchronisation point "
                        "before it gives up with an error (a rank that dies is noticed at "
                        "once; default %(default)g)")
    p.add_argument("--latency-rank", type=int, default=0, metavar="R",
                   help="the rank whose device times every configuration (default 0)")
    p.add_argument("--latency-per-rank", action="store_true",
                   help="every rank times every configuration on its own device, one rank "
                        "after the other; the report shows them side by side")


def settings_from_args(args: argparse.Namespace) -> Any:
    """harness.settings.CocoSettings from the flags over the experiment file."""
    from harness.settings import coco_settings

    return coco_settings(
        args.experiment, images=args.images, annotations=args.ann, config=args.cfg,
        checkpoint=args.ckpt, backends=args.backends, precisions=args.precisions,
        batches=args.batches, devices=args.devices, count=args.count, warmup=args.warmup,
        runs=args.runs, calib_count=args.calib_count, evaluator=args.evaluator,
        progress=not args.no_progress, out=args.out, nms_pre=args.nms_pre,
        score_thr=args.score_thr, iou_threshold=args.iou_threshold,
        max_per_img=args.max_per_img, preprocess=args.preprocess)


def run(args: argparse.Namespace) -> int:
    import os

    from harness.eval.distributed import RankFailure, prepare, ranks_from_env
    from harness.eval.latency import default_settings

    settings = settings_from_args(args)
    default_settings("cpu", settings.warmup, settings.runs)  # reject bad numbers early
    uses_cuda = any(c.device.startswith("cuda") for c in settings.configurations)
    ranks = ranks_from_env(args.launcher, os.environ, uses_cuda=uses_cuda,
                           timeout_s=args.dist_timeout, latency_rank=args.latency_rank,
                           latency_per_rank=args.latency_per_rank)
    try:
        ranks = prepare(ranks, uses_cuda)
        return _run(args, settings, ranks)
    except RankFailure as exc:  # not bad input: the run stopped; what was stored is kept
        print(f"harness coco: error: {exc}", file=sys.stderr)
        return 1
    finally:
        ranks.close()


def _run(args: argparse.Namespace, settings: Any, ranks: Any) -> int:
    from harness.cli import writable_dir
    from harness.eval.runner import run_coco, say
    from harness.eval.store import RunStore
    from harness.report.coco_report import write_coco_report

    out = writable_dir(settings.out) if ranks.main else settings.out
    # every rank's file too, whatever the world that wrote it, by each host's first rank (the
    # hosts may not share the folder); before the ranks join, so no rank has opened one yet
    if args.fresh and ranks.local_rank == 0:
        for c in settings.configurations:
            for path in RunStore.files_of(RunStore.path_for(settings.cache_dir, c.key)):
                path.unlink(missing_ok=True)
    if ranks.main:
        print(f"{len(settings.configurations)} configurations on {settings.images_dir}"
              + (f", {ranks.world} ranks" if ranks.distributed else ""))
    try:
        doc, runs = run_coco(settings, log=say if ranks.main else _quiet, ranks=ranks)
    except KeyboardInterrupt:
        print("finished batches are kept: run the same command again to resume",
              file=sys.stderr)
        raise
    if doc is None:  # a rank other than 0: rank 0 reports
        computed = sum(r.pass_times.images for r in runs if r.pass_times)
        found = sum(r.pass_times.skipped for r in runs if r.pass_times)
        print(f"rank {ranks.rank} of {ranks.world}: {computed} images computed, {found} found "
              "stored; rank 0 writes the report")
        return 0
    written = write_coco_report(doc, out, settings.experiment)
    print_rows(doc)
    print("wrote " + ", ".join(str(p) for p in written))
    return coco_exit_status(doc)


def _quiet(message: str) -> None:
    """Ranks other than 0 print little: rank 0 logs what the ranks agreed on."""


def print_rows(doc: Any) -> None:
    """One line per configuration: AP, ΔAP, latency, throughput, or why it did not run."""
    for r in doc.rows:
        label = (f"{r.backend:<11} {r.device:<4} {r.precision:<4} b{r.batch}"
                 + (f" pre{r.nms_pre}" if r.nms_pre is not None else "")
                 + (" batch-shapes" if r.preprocess == "batch_shapes" else ""))
        if r.ok:
            delta = "—" if r.delta_AP is None else f"{r.delta_AP:+.4f}"
            steady = r.latency_stability or {}
            mark = "  ⚠ unstable latency" if steady.get("stable") is False else ""
            print(f"{label}  AP {r.AP:.3f}  ΔAP {delta}  "
                  f"{r.latency_ms['total']['mean']:.1f} ms/batch  "
                  f"{r.images_per_s:.1f} img/s{mark}")
        else:
            print(f"{label}  {r.status}")
    if doc.dataset.unreadable:
        print(f"{doc.dataset.unreadable} unreadable images skipped")


def coco_exit_status(doc) -> int:
    """0 only when every configuration of the matrix ran and every image was read; 1
    otherwise (the report says which and why), as for compare. doc: harness.results.CocoResult."""
    missing = [r for r in doc.rows if not r.ok]
    if missing:
        print(f"{len(missing)} of {len(doc.rows)} configurations did not run (see the "
              "report)")
    return 1 if missing or doc.dataset.unreadable else 0
