"""The small synthetic COCO split the COCO tests run on (12 val images of seed 1, which the
fixture never saw), and copies of it broken in the ways users break theirs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

SPLIT_IMAGES = 24  # half of them val
SPLIT_SEED = 1


def make_split(root: Path) -> Path:
    """Write the synthetic dataset under `root`; returns its val2017 folder."""
    from harness.synth import generate_synthetic_coco

    generate_synthetic_coco(root, images=SPLIT_IMAGES, seed=SPLIT_SEED, val_fraction=0.5)
    return root / "val2017"


def copy_split(val_dir: Path, dest: Path) -> Path:
    """A copy of the split in COCO layout under `dest` (val2017/ + annotations/); returns
    the copy's val2017 folder."""
    shutil.copytree(val_dir, dest / "val2017")
    (dest / "annotations").mkdir(parents=True)
    shutil.copy(annotation_file(val_dir), dest / "annotations" / "instances_val2017.json")
    return dest / "val2017"


def annotation_file(val_dir: Path) -> Path:
    return val_dir.parent / "annotations" / "instances_val2017.json"


def edit_annotations(val_dir: Path, edit) -> Path:
    """Apply edit(doc) to the split's annotation file in place; returns its path."""
    path = annotation_file(val_dir)
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return path
