"""Shared fixtures: images of varied size and aspect, the fixture model paths."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# (w, h): landscape, portrait, near-square, and one small enough to be scaled up
VARIED_SIZES = [(500, 375), (333, 640), (640, 427), (120, 90)]


def synth_val_images(tmp_path_factory, name: str, images: int, seed: int) -> list[Path]:
    """The val images of a synthetic COCO split of `images` (half of them val), by seed."""
    from harness.synth import generate_synthetic_coco

    out = tmp_path_factory.mktemp(name)
    generate_synthetic_coco(out, images=images, seed=seed, val_fraction=0.5)
    return sorted((out / "val2017").glob("*.jpg"))


def draw_test_image(w: int, h: int, seed: int) -> np.ndarray:
    """A BGR uint8 image with smooth background, noise and a few filled shapes."""
    import cv2

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (60 + 80 * xx / w + 40 * yy / h).astype(np.float32)
    img = np.stack([base, base[::-1] * 0.8, 255 - base], axis=-1)
    img += rng.normal(0, 12, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(6):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(5, max(6, min(w, h) // 3)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), r, colour, -1)
        else:
            cv2.rectangle(img, (x - r, y - r // 2), (x + r, y + r // 2), colour, -1)
    return img


@pytest.fixture(scope="session")
def varied_images(tmp_path_factory) -> list[Path]:
    import cv2

    folder = tmp_path_factory.mktemp("varied_images")
    paths = []
    for i, (w, h) in enumerate(VARIED_SIZES):
        p = folder / f"img_{i}_{w}x{h}.jpg"
        cv2.imwrite(str(p), draw_test_image(w, h, seed=i))
        paths.append(p)
    return paths


# -- the fixture model, its preprocessed batch and its exported ONNX files (tests/export,
# tests/backends); session-scoped because building and exporting take seconds each

@pytest.fixture(scope="session")
def fixture_model():
    from harness.models.mmyolo import load_mmyolo_model
    from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG

    return load_mmyolo_model(FIXTURE_CONFIG, FIXTURE_CHECKPOINT)


@pytest.fixture(scope="session")
def fixture_batch(fixture_model, varied_images):
    """The 4 varied images preprocessed for the fixture: (4, 3, 320, 320) float32."""
    from harness.data.preprocess import preprocess_files

    return preprocess_files(varied_images, fixture_model.preprocess)


@pytest.fixture(scope="session")
def fixture_onnx(fixture_model, varied_images, tmp_path_factory):
    """fixture_onnx(**ExportSettings fields) → ExportResult, each distinct export made once.
    int8 files are calibrated on the varied images."""
    from harness.export.calibration import CalibrationSettings
    from harness.export.onnx_export import ExportSettings, export_onnx

    folder = tmp_path_factory.mktemp("fixture_onnx")
    made = {}

    def export(**fields):
        key = tuple(sorted(fields.items()))
        if key not in made:
            calibration = None
            if fields.get("precision") == "int8":
                calibration = CalibrationSettings(images=varied_images[0].parent, count=4,
                                                  cache_dir=folder / "calibration")
            name = "_".join(f"{k}-{v}" for k, v in key) or "raw"
            made[key] = export_onnx(fixture_model, folder / f"{name}.onnx",
                                    ExportSettings(**fields), calibration)
        return made[key]

    return export


# Real photographs of real size and varied aspect, from packages the test extra installs:
# (package, file, rotate) → landscape 600x400, portrait 427x640 (the rocket photo turned on
# its side), portrait 512x600. Public domain / CC0 (scikit-image's data/README.txt,
# matplotlib's sample_data: Grace Hopper, US Navy).
REAL_PHOTOS = [("skimage", "data/coffee.png", False), ("skimage", "data/rocket.jpg", True),
               ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", False)]


@pytest.fixture(scope="session")
def real_photos(tmp_path_factory) -> list[Path]:
    """Real photographs as JPEG files (w x h in the name)."""
    import importlib.util

    import cv2

    folder = tmp_path_factory.mktemp("real_photos")
    paths = []
    for package, name, rotate in REAL_PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            pytest.fail(f"{package} is not installed: install harness[test]")
        img = cv2.imread(str(Path(spec.origin).parent / name))
        assert img is not None, f"{package} ships no {name}"
        if rotate:
            img = cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE)
        h, w = img.shape[:2]
        p = folder / f"{Path(name).stem}_{w}x{h}.jpg"
        cv2.imwrite(str(p), img)
        paths.append(p)
    return paths
