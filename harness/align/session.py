"""One compare run from its settings (harness.settings.CompareSettings): the model, the
images, every target opened — or, when it cannot be, a row saying why — then run_compare.
What `harness compare` and `harness demo` both call."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from harness.errors import UserError
from harness.results import CompareResult


def default_target(model: Any, out: Path) -> Path:
    """The raw fp32 ONNX of the model, exported into the report folder (reused when it was
    exported from the same checkpoint and settings)."""
    from harness.export.onnx_export import ExportSettings, export_cached

    return export_cached(model, out / f"{Path(model.cfg_path).stem}_raw_fp32.onnx",
                         ExportSettings(variant="raw"))


def open_or_say_why(path: Path, provider: str, onnx: Any = None) -> Any:
    """The target behind `path` (onnx: an engine's source ONNX, --onnx), or, when the file
    cannot be loaded (corrupt, of an unknown layout), a target row saying why: the other
    targets are still compared."""
    from harness.align.targets import Target, open_target, target_kind

    try:
        return open_target(path, provider=provider, onnx=onnx)
    except UserError as exc:
        return Target(Path(path), target_kind(path), reason=f"could not be compared: {exc}")


def compare_with_settings(settings: Any, say: Callable[[str], None] = print) -> CompareResult:
    """Run the comparison `settings` (CompareSettings) describe. A missing file or an unknown
    file type is a UserError before anything slow starts."""
    from harness.align.compare import run_compare
    from harness.align.detections import Tolerances
    from harness.align.targets import target_kind
    from harness.data.preprocess import list_images
    from harness.models.config import load_model_source

    for t in settings.targets:
        kind = target_kind(t)  # refuse an unknown file type before the slow parts
        if not t.is_file():
            raise UserError(f"{kind} file not found: {t}")
    images = list_images(settings.images, settings.count)
    model = load_model_source(settings.config, settings.checkpoint, device=settings.device)
    model = model.with_nms(**settings.test_cfg)  # the reference as the user aligned it
    paths = list(settings.targets) or [default_target(model, settings.out)]
    targets = [open_or_say_why(p, settings.provider, settings.engine_onnx.get(p))
               for p in paths]
    for t in targets:
        say(f"{t.name}: " + (f"{t.kind}, {t.precision}" if t.available else t.reason))
    tol = Tolerances(score=settings.score_tol, box_px=settings.box_tol,
                     iou_band=settings.iou_band)
    return run_compare(model, targets, images, batch=settings.batch,
                       layer_patterns=settings.layers, with_layers=settings.with_layers,
                       batch_invariance=settings.batch_invariance,
                       tol=tol, work_dir=settings.out)
