"""`harness detect cfg.py ckpt IMAGE...`: the model source end to end on image files —
the harness's own preprocessing, PyTorch forward, decoding and mmyolo-style NMS."""
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


def run(args: argparse.Namespace) -> int:
    from harness.data.preprocess import preprocess_files
    from harness.models.mmyolo import load_mmyolo_model

    model = load_mmyolo_model(args.config, args.checkpoint, device=args.device)
    print(f"{model.family} ({model.head_type}), {model.num_classes} classes, "
          f"NMS: {model.nms}")
    records = []
    for path in args.images:
        batch = preprocess_files([path], model.preprocess)
        det = model.predict(batch)[0]
        meta = batch.metas[0]
        print(f"{path}: {meta.ori_shape[1]}x{meta.ori_shape[0]} → input "
              f"{batch.inputs.shape[3]}x{batch.inputs.shape[2]}, {len(det.scores)} detections")
        for box, score, label in list(zip(det.boxes, det.scores, det.labels))[: args.top]:
            print(f"  {model.class_names[label]:<12} {score:.3f}  "
                  f"[{box[0]:.1f}, {box[1]:.1f}, {box[2]:.1f}, {box[3]:.1f}]")
        records.append({"image": str(path), "input_sha256": batch.sha256,
                        "boxes": det.boxes.tolist(), "scores": det.scores.tolist(),
                        "labels": det.labels.tolist()})
    if args.json:
        from harness.cli import writable_dir

        writable_dir(args.json.parent)
        args.json.write_text(json.dumps({"model": model.describe(), "images": records}, indent=1))
        print(f"wrote {args.json}")
    return 0
