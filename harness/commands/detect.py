"""`harness detect cfg.py ckpt IMAGE...`: the model source end to end on image files —
the harness's own preprocessing, PyTorch forward, decoding and mmyolo-style NMS; with
`--onnx FILE`, the same preprocessed batch through an exported file on onnxruntime instead."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="mmyolo config (.py)")
    p.add_argument("checkpoint", type=Path, help="checkpoint (.pth) of that config")
    p.add_argument("images", type=Path, nargs="+", help="image files")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="also write detections as JSON")
    p.add_argument("--top", type=int, default=5, help="detections printed per image")
    p.add_argument("--onnx", type=Path, default=None,
                   help="run this exported ONNX file on onnxruntime instead of PyTorch "
                        "(end2end files: their own NMS; others: mmyolo's NMS)")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                   help="onnxruntime provider for --onnx")
    p.add_argument("--batch", type=int, default=1, help="images per inference")


def run(args: argparse.Namespace) -> int:
    from harness.data.preprocess import preprocess_files
    from harness.errors import UserError
    from harness.models.config import load_model_source

    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    model = load_model_source(args.config, args.checkpoint, device=args.device)
    print(f"{model.family} ({model.head_type}), {model.num_classes} classes, "
          f"NMS: {model.nms}")
    backend = None
    if args.onnx is not None:
        from harness.backends import OnnxruntimeBackend

        backend = OnnxruntimeBackend(args.onnx, provider=args.provider)
        backend.load()
        info = backend.describe()
        print(f"{args.onnx}: {info.get('variant') or 'foreign file'}, {info['precision']}, "
              f"{info['provider']}")
    records = []
    for start in range(0, len(args.images), args.batch):
        paths = args.images[start:start + args.batch]
        batch = preprocess_files(paths, model.preprocess)
        if backend is None:
            dets = model.predict(batch)
        else:
            from harness.export.outputs import detections_from_outputs

            dets = detections_from_outputs(model, backend.infer(batch.inputs), batch.metas)
        for path, meta, det in zip(paths, batch.metas, dets):
            print(f"{path}: {meta.ori_shape[1]}x{meta.ori_shape[0]} → input "
                  f"{batch.inputs.shape[3]}x{batch.inputs.shape[2]}, {len(det.scores)} "
                  "detections")
            for box, score, label in list(zip(det.boxes, det.scores, det.labels))[: args.top]:
                print(f"  {model.class_names[label]:<12} {score:.3f}  "
                      f"[{box[0]:.1f}, {box[1]:.1f}, {box[2]:.1f}, {box[3]:.1f}]")
            records.append({"image": str(path), "input_sha256": batch.sha256,
                            "boxes": det.boxes.tolist(), "scores": det.scores.tolist(),
                            "labels": det.labels.tolist()})
    if args.json:
        from harness.cli import writable_dir

        writable_dir(args.json.parent)
        summary = {"model": model.describe(), "images": records,
                   "backend": backend.describe() if backend else None}
        args.json.write_text(json.dumps(summary, indent=1))
        print(f"wrote {args.json}")
    return 0
