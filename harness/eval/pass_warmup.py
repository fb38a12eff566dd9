"""A pass's warm-up: the backend and the post-processing run once, before the pass is timed,
on blank images of the pass's first batch's sizes, while the readers already read the first
real batches.

Why: a backend's first call carries its one-time set-up (CUDA context and kernels, cuDNN's
algorithm search, TensorRT's first enqueue), the fast post its CUDA graph captures (~0.6 s on
the H200); timed inside the pass they make its inference look slower, or its host look
slower, than either is. The blank batch has the shape the first batch's images will have
(their annotated sizes through the same preprocessing), so the warm-up is for that shape;
its results are thrown away.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import numpy as np


def blank_batch(chunk: Sequence[Any], spec: Any) -> Optional[tuple[np.ndarray, list]]:
    """(inputs, metas) of blank images of `chunk`'s annotated sizes (SplitImage width,
    height, batch_shape) through `spec`, or None where a size is not known or does not go
    through (the pass then meets that image itself)."""
    from harness.data.preprocess import stack_inputs, transform_image
    from harness.errors import UserError

    if not chunk or any(getattr(im, "width", 0) <= 0 or getattr(im, "height", 0) <= 0
                        for im in chunk):
        return None
    made: dict[tuple, tuple[np.ndarray, Any]] = {}  # one transform per distinct size
    arrays, metas = [], []
    try:
        for im in chunk:
            key = (im.height, im.width, getattr(im, "batch_shape", None))
            if key not in made:
                made[key] = transform_image(np.zeros((im.height, im.width, 3), np.uint8),
                                            spec, "", key[2])
            arrays.append(made[key][0])
            metas.append(made[key][1])
        return stack_inputs(arrays, spec), metas
    except UserError:
        return None


def warm_up(batch: tuple[np.ndarray, list], infer: Callable[..., Any],
            post: Callable[..., Any], sync: Optional[Callable[[], None]] = None,
            calls: int = 1) -> float:
    """Run infer and post once on `batch` (blank_batch's); the seconds it took. calls: how
    many post calls the pass may run side by side, told to a post that prepares for them
    (`post.prepare(calls)`: coco_graphs' staging buffers) before its call."""
    t0 = time.perf_counter()
    prepare = getattr(post, "prepare", None)
    if prepare is not None:
        prepare(calls)
    inputs, metas = batch
    outputs = infer(inputs, metas)
    if sync:
        sync()
    post(outputs, metas)
    return time.perf_counter() - t0
