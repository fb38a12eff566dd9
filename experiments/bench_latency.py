"""Whether the inference time the harness reports is the backend's own: in one process, on
the same model, session and preprocessed batch, it alternates rounds of

  harness   harness.eval.inference_timing.time_inference (host end-to-end: backend.infer,
            numpy in → numpy out), and
  bare      a bare loop over the same session / module (onnxruntime: session.run on the same
            feeds; PyTorch: the source's forward on a tensor made from the numpy batch, every
            output back to numpy),

and prints per backend the median of each, their ratio (target <= 1.03), and the compute
figure (IO binding / CUDA events) beside them. Then, because a GPU's speed drifts between
rounds by more than 3 % (reports/latency-h200), it alternates the two calls one by one (the
order swapped every pair), so each harness call has a bare call next to it in the same
machine state, and prints the median of the per-pair ratios ("interleaved").

    python experiments/bench_latency.py                       # CPU, the fixture, batch 1 and 4
    python experiments/bench_latency.py --device cuda --runs 500 --warmup 50
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=100, help="timed runs per method, in total")
    p.add_argument("--rounds", type=int, default=5,
                   help="the runs are split into this many alternating rounds per method")
    return p.parse_args()


def batch_of(model, size: int, work: Path):
    from harness.align.compare import _batches
    from harness.data.preprocess import list_images
    from harness.synth import generate_synthetic_coco

    generate_synthetic_coco(work / "synth", images=16, seed=0, val_fraction=0.5)
    images = list_images(work / "synth" / "val2017", size)
    return next(_batches(images, model.preprocess, size, []))


def bare_loop(name: str, backend, inputs, metas, device: str):
    """A loop the harness had no part in: one call, numpy in → numpy out."""
    if name == "onnxruntime":
        session, feeds = backend._session, backend._feed(inputs, metas)
        return lambda: session.run(None, feeds)
    import torch

    model = backend._model

    def call():
        with torch.no_grad():
            x = torch.from_numpy(inputs).to(device)
            out = model.head_outputs(x, metas)
            return [v.float().cpu().numpy() for v in out.values()]
    return call


def interleaved(ours, theirs, runs: int, sync) -> float:
    """Median over `runs` pairs of (harness call time / bare call time), the two calls of a
    pair back to back, which one goes first alternating pair by pair."""
    import numpy as np

    clock = time.perf_counter

    def timed(fn) -> float:
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        return clock() - t0

    ratios = []
    for k in range(runs):
        if k % 2 == 0:
            a = timed(ours)
            b = timed(theirs)
        else:
            b = timed(theirs)
            a = timed(ours)
        ratios.append(a / b)
    return float(np.median(ratios))


def main() -> None:
    import numpy as np

    from harness.backends.onnxruntime_backend import OnnxruntimeBackend
    from harness.backends.torch_backend import TorchBackend
    from harness.eval.inference_timing import time_host, time_inference
    from harness.eval.latency import LatencySettings, cuda_sync
    from harness.export.onnx_export import ExportSettings, export_onnx
    from harness.models.config import load_model_source
    from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG

    args = parse()
    device = "cuda:0" if args.device == "cuda" else "cpu"
    sync = cuda_sync(device)
    model = load_model_source(FIXTURE_CONFIG, FIXTURE_CHECKPOINT, device=device)
    per_round = max(1, args.runs // args.rounds)
    print(f"{'backend':<12} {'batch':>5} {'harness ms':>11} {'bare ms':>9} {'ratio':>7} "
          f"{'compute ms':>11} {'interleaved':>11}  compute method")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        onnx_path = export_onnx(model, work / "model.onnx", ExportSettings()).path
        for name in args.backends:
            backend = TorchBackend(model, device=device, outputs="raw") if name == "torch" \
                else OnnxruntimeBackend(onnx_path, provider=args.device)
            backend.load()
            for size in args.batches:
                data = batch_of(model, size, work)
                bare = bare_loop(name, backend, data.inputs, data.metas, device)
                warm = LatencySettings(args.warmup, 1)
                time_host(bare, warm, sync)
                time_inference(backend, data.inputs, data.metas, warm, sync)
                ours, theirs, compute, method = [], [], [], None
                for k in range(args.rounds):
                    # which method goes first alternates round by round (ABBA...), so neither
                    # always runs right after the other
                    for which in ((0, 1) if k % 2 == 0 else (1, 0)):
                        if which == 0:
                            timing = time_inference(backend, data.inputs, data.metas,
                                                    LatencySettings(0, per_round), sync)
                            ours.append(timing.host["median"])
                            if timing.compute is not None:
                                compute.append(timing.compute["median"])
                                method = timing.compute_method
                        else:
                            theirs.append(1000 * float(np.median(
                                time_host(bare, LatencySettings(0, per_round), sync))))
                # the median of the rounds' medians, the same way for both methods
                h, b = float(np.median(ours)), float(np.median(theirs))
                c = f"{np.median(compute):11.2f}" if compute else f"{'—':>11}"
                paired = interleaved(lambda: backend.infer(data.inputs, data.metas), bare,
                                     args.runs, sync)
                print(f"{name:<12} {size:>5} {h:11.2f} {b:9.2f} {h / b:7.3f} {c} "
                      f"{paired:11.3f}  {method or ''}", flush=True)
                time.sleep(0.1)


if __name__ == "__main__":
    main()
