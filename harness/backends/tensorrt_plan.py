"""What a TensorRT build and run need that can be computed without TensorRT: the optimization
profile from the ONNX input and the batch options, output buffer sizes, calibration batches and
their cache file, and the ONNX tensors to mark as outputs for the layer diff. Plain functions,
tested on CPU; harness.backends.tensorrt_build and tensorrt_backend call them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar, Union

import numpy as np

from harness.errors import UserError

Dim = Union[int, str, None]
T = TypeVar("T")

# TensorRT DataType member names (trt.DataType.X.name; str() gives "DataType.X") → numpy dtype
# of the buffer. The same seven types trt.nptype() maps (python/packaging/bindings_wheel/
# tensorrt/__init__.py, TensorRT 10.x); BF16, FP8, INT4, FP4 and E8M0 have no numpy type and
# are refused rather than given a buffer of the wrong element size.
TRT_DTYPES: dict[str, np.dtype] = {
    "FLOAT": np.dtype(np.float32), "HALF": np.dtype(np.float16), "INT8": np.dtype(np.int8),
    "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64), "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
}


@dataclass(frozen=True)
class BatchProfile:
    """One optimization profile over the batch axis: each a full input shape (B, C, H, W)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def fits(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(
            lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_json(cls, doc: dict[str, Sequence[int]]) -> "BatchProfile":
        return cls(tuple(doc["min"]), tuple(doc["opt"]), tuple(doc["max"]))


def extra_input_shapes(onnx_path: Any, inputs: Sequence[Any]) -> dict[str, tuple[int, ...]]:
    """The graph's inputs (onnx ValueInfoProtos, images first) besides the images, with
    their static dims after the batch axis: only a two-stage graph's `img_shape` (B, 2),
    which follows the images' batch profile. Anything else is a UserError: the harness feeds
    nothing more."""
    from harness.backends.onnxruntime_backend import _dims
    from harness.export.variants import IMG_SHAPE_INPUT

    if not inputs:
        raise UserError(f"{onnx_path} has no inputs; the harness feeds a batch of images")
    out: dict[str, tuple[int, ...]] = {}
    for extra in inputs[1:]:
        rest = _dims(extra)[1:]
        if extra.name != IMG_SHAPE_INPUT or not all(isinstance(d, int) for d in rest):
            names = ", ".join(i.name for i in inputs)
            raise UserError(f"{onnx_path} has inputs {names}; the harness feeds the images "
                            f"and, to a two-stage graph, {IMG_SHAPE_INPUT} (B, 2)")
        out[extra.name] = tuple(int(d) for d in rest)
    return out


def profile_shapes(input_dims: Sequence[Dim], min_batch: int = 1, opt_batch: int = 4,
                   max_batch: int = 4, input_name: str = "images") -> BatchProfile:
    """The (min, opt, max) shapes for an ONNX input whose dims are `input_dims` (int static,
    str symbolic, None unknown). Only axis 0 may be dynamic; a static batch must equal all
    three batch options (an engine cannot run other batches of it)."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UserError(f"batch profile must satisfy 1 <= min <= opt <= max, got "
                        f"min {min_batch}, opt {opt_batch}, max {max_batch}")
    if not input_dims:
        raise UserError(f"input {input_name} has no dims; TensorRT needs (B, C, H, W)")
    rest = list(input_dims[1:])
    loose = [i for i, d in enumerate(rest, start=1) if not isinstance(d, int)]
    if loose:
        raise UserError(f"input {input_name} has a dynamic axis {loose[0]} "
                        f"({rest[loose[0] - 1]!r}); only the batch axis may be dynamic: "
                        "export with --input-size H W")
    batch = input_dims[0]
    if isinstance(batch, int) and not (min_batch == opt_batch == max_batch == batch):
        raise UserError(f"input {input_name} has a static batch of {batch}; it cannot take "
                        f"batches {min_batch}..{max_batch}: pass --min-batch/--opt-batch/"
                        f"--max-batch {batch}, or export with a dynamic batch")
    rest_i = tuple(int(d) for d in rest)  # type: ignore[arg-type]
    return BatchProfile((min_batch, *rest_i), (opt_batch, *rest_i), (max_batch, *rest_i))


def check_batch(profile: BatchProfile, shape: Sequence[int], engine: str = "engine",
                fix: str = "rebuild with --min-batch/--max-batch covering it") -> None:
    """UserError, before anything runs, when `shape` is outside the profile; `fix` says
    what to do (an engine another tool built is not rebuilt with harness's flags)."""
    if not profile.fits(shape):
        raise UserError(f"input {tuple(shape)} is outside {engine}'s profile (min "
                        f"{profile.min}, max {profile.max}): {fix}")


def resolve_shape(shape: Sequence[int], batch: int) -> tuple[int, ...]:
    """An engine tensor shape with -1 (dynamic) batch replaced by `batch`; any other -1 is an
    error (the engine should have resolved it from the input shape)."""
    dims = [int(d) for d in shape]
    if dims and dims[0] == -1:
        dims[0] = batch
    if any(d < 0 for d in dims):
        raise UserError(f"tensor shape {tuple(shape)} has unresolved dynamic axes besides "
                        "the batch")
    return tuple(dims)


def numpy_dtype(trt_dtype: str, tensor: str = "") -> np.dtype:
    """The numpy dtype of a TensorRT DataType name (`FLOAT`, `DataType.HALF`, ...); a type
    without one (BF16, FP8, ...) is a UserError naming the tensor."""
    key = trt_dtype.rsplit(".", 1)[-1].upper()
    if key not in TRT_DTYPES:
        where = f" of tensor {tensor}" if tensor else ""
        raise UserError(f"unsupported TensorRT type {trt_dtype}{where}: the harness reads "
                        f"{', '.join(TRT_DTYPES)}; export the ONNX with float32 outputs")
    return TRT_DTYPES[key]


def output_buffer(shape: Sequence[int], dtype: Union[str, np.dtype], batch: int
                  ) -> tuple[tuple[int, ...], np.dtype, int]:
    """(resolved shape, numpy dtype, bytes) of one output buffer. dtype: a numpy dtype or a
    TensorRT DataType name (`FLOAT`, `DataType.HALF`, ...)."""
    np_dtype = numpy_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    resolved = resolve_shape(shape, batch)
    return resolved, np_dtype, int(np.prod(resolved, dtype=np.int64)) * np_dtype.itemsize


# -- int8 calibration -------------------------------------------------------------------------

def calibration_batches(paths: Sequence[T], batch_size: int, last: str = "pad"
                        ) -> list[list[T]]:
    """Split calibration images into batches of `batch_size`. last: "pad" repeats images from
    the start to fill the last batch (every image calibrates; the repeats weigh a few images
    twice), "drop" leaves a short last batch out. TensorRT's calibrator asks for exactly
    get_batch_size() images per call, so a short batch cannot be passed as it is."""
    if batch_size < 1:
        raise UserError(f"calibration batch size must be at least 1, got {batch_size}")
    if last not in ("pad", "drop"):
        raise UserError(f"last calibration batch: choose pad|drop, got {last!r}")
    items = list(paths)
    if not items:
        raise UserError("no calibration images")
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    if len(batches[-1]) < batch_size:
        if last == "drop":
            batches.pop()
            if not batches:
                raise UserError(f"{len(items)} calibration images make no full batch of "
                                f"{batch_size}; use more images or a smaller batch")
        else:
            short = batches[-1]
            i = 0
            while len(short) < batch_size:
                short.append(items[i % len(items)])
                i += 1
    return batches


def calibration_cache_path(cache_dir: Union[str, Path], onnx_path: Union[str, Path],
                           images: Sequence[Union[str, Path]], method: str = "entropy2"
                           ) -> Path:
    """`<cache_dir>/trt-<sha256>.cache`: the key covers the ONNX bytes, each image's name and
    content, and the method, so any change calibrates afresh and a rerun reuses the ranges."""
    from harness.export.metadata import file_sha256

    doc = {"onnx": file_sha256(onnx_path),
           "images": [[Path(p).name, file_sha256(p)] for p in images], "method": method}
    key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / f"trt-{key}.cache"


# -- layers to mark as outputs (layer diff) ---------------------------------------------------

def module_prefixes(path: str) -> list[str]:
    """A PyTorch module path (`backbone.stage1.0`) or ONNX scope (`/backbone/stage1/stage1.0`)
    as the ONNX node-name prefixes it can have. The exporter names nodes by module scope; an
    indexed child appears as `/stage1/stage1.0/` under a Sequential but as `/reduce_layers.2/`
    under a ModuleList, so both spellings are tried for each index."""
    if path.startswith("/"):
        return [path.rstrip("/") + "/"]
    parts = path.split(".")
    spellings: list[list[str]] = [[]]
    for i, part in enumerate(parts):
        if part.isdigit() and i:
            joined = f"{parts[i - 1]}.{part}"
            spellings = [s + [joined] for s in spellings] + \
                [s[:-1] + [joined] for s in spellings]
        else:
            spellings = [s + [part] for s in spellings]
    return list(dict.fromkeys("/" + "/".join(s) + "/" for s in spellings))


def select_layers(node_names: Sequence[str], requested: Sequence[str]) -> list[str]:
    """The node names (in graph order) matching any requested module path / scope prefix or
    exact node name. Marking every layer stops TensorRT's fusions and can run out of memory
    (NVIDIA/TensorRT issues #2571, #4444), so the layer diff marks only what it compares."""
    if not requested:
        return []
    chosen: set[str] = set()
    for request in requested:
        prefixes = tuple(module_prefixes(request))
        hits = {n for n in node_names if n == request or n.startswith(prefixes)}
        if not hits:
            raise UserError(f"no ONNX node matches {request!r} (looked for names starting "
                            f"with {' or '.join(prefixes)})")
        chosen |= hits
    return [n for n in node_names if n in chosen]


def select_tensors(nodes: Sequence[tuple[str, Sequence[str]]], requested: Sequence[str]
                   ) -> list[str]:
    """The ONNX tensor names to mark for `requested` (module paths / scopes / node names, as
    select_layers takes them): every output of each matching node of `nodes` ((node name,
    output names) in graph order), in graph order, without repeats.

    Tensors, not layers, because the ONNX parser names each TensorRT tensor after the ONNX
    tensor it computes (onnx-tensorrt ModelImporter.cpp: registerTensor(output, outputName)),
    and those are the names onnxruntime's intermediates use; its layers get the node name only
    for the first layer of a node ("name_N" for the next, "ONNXTRT_*" for helpers,
    ImporterContext.cpp registerLayer), so a layer-name match can miss the node's output and
    mark internal helper tensors instead."""
    chosen = set(select_layers([name for name, _ in nodes], requested))
    names = [t for name, outputs in nodes if name in chosen for t in outputs if t]
    return list(dict.fromkeys(names))


def chunks(names: Sequence[T], size: int) -> Iterator[list[T]]:
    """`names` in consecutive pieces of at most `size`: one debug engine per piece."""
    if size < 1:
        raise UserError(f"chunk size must be at least 1, got {size}")
    for i in range(0, len(names), size):
        yield list(names[i:i + size])
