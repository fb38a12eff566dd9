"""Synthetic COCO-format detection datasets for fixtures (tests, the fixture model, `harness
demo`): five shape classes on cluttered, noisy backgrounds, deterministic per seed. Not a
pipeline stage: only the `synth` and `demo` commands, tests and experiments use it.
"""
from __future__ import annotations

from harness.synth.annotations import SIZE_NAMES
from harness.synth.coco import SynthSummary, generate_synthetic_coco
from harness.synth.shapes import CLASSES

__all__ = ["CLASSES", "SIZE_NAMES", "SynthSummary", "generate_synthetic_coco"]
