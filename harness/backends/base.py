"""The one protocol every runtime implements: `load`, `infer`, `intermediates`, `describe`,
plus `run`, which records what went in (the input's sha256 and shape) with what came out, so
results can prove that two backends received the very same bytes.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import numpy as np

from harness.errors import UserError


def input_sha256(inputs: np.ndarray) -> str:
    """sha256 of the input bytes, the same digest as harness.data.preprocess.Batch.sha256."""
    from harness.data.preprocess import Batch

    return Batch(inputs=inputs).sha256


def check_images(inputs: np.ndarray) -> np.ndarray:
    """The network input every backend accepts: float32 (B, 3, H, W), made C-contiguous."""
    if not isinstance(inputs, np.ndarray):
        raise UserError(f"backend input must be a numpy array, got {type(inputs).__name__}")
    if inputs.dtype != np.float32:
        raise UserError(f"backend input must be float32 (the harness's preprocessed batch), "
                        f"got {inputs.dtype}")
    if inputs.ndim != 4 or inputs.shape[1] != 3 or inputs.shape[0] < 1:
        raise UserError(f"backend input must be (B, 3, H, W) images, got shape "
                        f"{tuple(inputs.shape)}")
    return np.ascontiguousarray(inputs)


@dataclass
class BackendResult:
    """One inference: named outputs, the identity of the input, and the backend that ran it.

    outputs: name → array (float32 unless the output is an index or count). input_sha256:
    digest of the exact input bytes; input_shape: (B, 3, H, W); backend: describe();
    seconds: wall time of infer() alone (no preprocessing).
    """

    outputs: dict[str, np.ndarray]
    input_sha256: str
    input_shape: tuple[int, ...]
    backend: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class Backend(ABC):
    """A runtime that takes the harness's preprocessed float32 batch and returns named arrays.

    Constructing one is cheap; `load()` builds the expensive object (module copy, session) and
    is called by the first `infer` if the caller did not.

    The class attributes and class methods below are everything the rest of the harness knows
    about a runtime (experiment validation, the coco matrix, compare targets, plots, report
    labels read them through harness.backends.registry): a new runtime is one subclass in one
    file plus one line in harness/backends/__init__.py.
    """

    name: ClassVar[str]                     # in experiment files, results and the CLI
    label: ClassVar[str] = ""               # in reports: "PyTorch", "TensorRT"
    precisions: ClassVar[tuple[str, ...]] = ()  # what it runs (the matrix pairs only these)
    devices: ClassVar[tuple[str, ...]] = ("cpu",)  # where; a single device is where it runs
    file_suffixes: ClassVar[tuple[str, ...]] = ()  # the files `harness compare` opens with it
    file_kind: ClassVar[str] = ""           # what results call such a file: onnx | engine
    plot_marker: ClassVar[str] = "D"        # matplotlib marker in the AP-vs-latency plot
    # takes inputs of any height and width (the rectangles of mmyolo's batch shapes)
    dynamic_input_size: ClassVar[bool] = False
    # outputs are host arrays when infer() returns (no device sync needed around it)
    synchronous: ClassVar[bool] = True

    @classmethod
    def unavailable(cls, device: str) -> Optional[str]:
        """Why this runtime cannot run on `device` on this machine (naming what to install),
        or None when it can."""
        return None

    @classmethod
    def for_configuration(cls, config: Any, model: Any, files: Any
                          ) -> tuple["Backend", dict[str, Any]]:
        """(loaded backend, fingerprint) for one row of the coco matrix. config:
        experiment.Configuration; files: eval.coco_backends.ModelFiles (exports / builds the
        files a row needs); fingerprint: what the row's stored results depend on."""
        raise UserError(f"the {cls.name} backend cannot run a coco matrix row")

    @classmethod
    def open_file(cls, path: Path, device: str) -> "Backend":
        """A loaded backend for a file `harness compare` was given (suffix in
        file_suffixes); UserError when the file cannot be loaded."""
        raise UserError(f"the {cls.name} backend opens no files")

    def source_onnx(self) -> Optional[Path]:
        """The ONNX graph that names this backend's layers (for the layer diff), if any."""
        return None

    def runtime(self) -> str:
        """The runtime and its version, as the reports print it: "onnxruntime 1.32.0"."""
        version = self.describe().get(self.name)
        return f"{self.label or self.name} {version}" if version else (self.label or self.name)

    @abstractmethod
    def load(self) -> None:
        """Build what inference needs; idempotent."""

    @abstractmethod
    def infer(self, inputs: np.ndarray, metas: Optional[Sequence[Any]] = None
              ) -> dict[str, np.ndarray]:
        """inputs: (B, 3, H, W) float32 → output name → numpy array. metas: the batch's
        ImageMeta, for a model whose stages depend on each image's shape (a two-stage
        detector clips its proposals to img_shape); None: every image fills the input."""

    @abstractmethod
    def intermediates(self, inputs: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The named intermediate tensors (backend-specific names, see intermediate_names())
        for `inputs`, as float32 numpy arrays."""

    @abstractmethod
    def intermediate_names(self) -> list[str]:
        """Every name `intermediates` accepts, in graph / module order."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Plain data for reports: backend, library versions, device, provider, precision."""

    def run(self, inputs: np.ndarray) -> BackendResult:
        """infer() with the input's digest and shape and this backend's description."""
        inputs = check_images(inputs)
        digest = input_sha256(inputs)
        self.load()
        started = time.perf_counter()
        outputs = self.infer(inputs)
        seconds = time.perf_counter() - started
        return BackendResult(outputs=outputs, input_sha256=digest,
                             input_shape=tuple(int(d) for d in inputs.shape),
                             backend=self.describe(), seconds=seconds)
