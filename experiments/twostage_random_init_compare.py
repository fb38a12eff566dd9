"""mmdet's shipped Faster R-CNN / Mask R-CNN configs (ResNet-50 + FPN, 80 classes) at random
init, the box head spread as tests/models/test_twostage_source.py spreads it, compared by
`harness compare`'s run_compare against their raw fp32 ONNX on real photographs at full size.
Prints the verdict, the worst layer rel-L2, the proposal diff and the detection counts.

    PYTHONPATH=. python experiments/twostage_random_init_compare.py [faster_rcnn|mask_rcnn] [--images N]

Needs scikit-image and matplotlib's sample photos (installed with harness[test])."""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path


def photos(folder: Path) -> list[Path]:
    import cv2

    from tests.conftest import REAL_PHOTOS

    out = []
    for package, name, rotate in REAL_PHOTOS:
        spec = importlib.util.find_spec(package)
        img = cv2.imread(str(Path(spec.origin).parent / name))
        if rotate:
            img = cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE)
        path = folder / f"{Path(name).stem}_{img.shape[1]}x{img.shape[0]}.jpg"
        cv2.imwrite(str(path), img)
        out.append(path)
    return out


def main() -> None:
    from harness.align.compare import run_compare
    from harness.align.session import default_target, open_or_say_why
    from harness.models.config import load_model_source
    from tests.models.test_twostage_source import CONFIGS, mmdet_config, spread_box_head

    p = argparse.ArgumentParser()
    p.add_argument("which", nargs="?", default="faster_rcnn", choices=sorted(CONFIGS))
    p.add_argument("--images", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = load_model_source(mmdet_config(CONFIGS[args.which]))
        spread_box_head(model)
        started = time.perf_counter()
        target = open_or_say_why(default_target(model, work), "cpu")
        doc = run_compare(model, [target], photos(work)[:args.images], batch=1, work_dir=work,
                          progress=False)
        t = doc.targets[0]
        print(doc.verdict)
        print(f"layers {len(t.layers.rows)}, worst rel-L2 "
              f"{max(r.rel_l2 for r in t.layers.rows):.2g}, not mapped {t.layers.unmapped}")
        p = t.proposals
        print(f"proposals: {p['identical']} of {p['reference']} identical, unexplained "
              f"{p['unexplained']}; detections: {t.detections.reference} PyTorch, "
              f"{t.detections.mismatches} differ; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
