"""The fixture detector exported by mmdeploy 1.3.1 with the deploy configs mmyolo 0.6.0 ships
(`mmyolo/.mim/configs/deploy/`): real foreign ONNX files for the harness to recognise.
How they are made and what is in them: tests/foreign/README.md.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping
from unittest import mock

from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG, mmyolo_config_root

from tests.foreign.torchscript_export import torchscript_onnx_export

MMDEPLOY_VERSION = "1.3.1"
# what to install when it is missing: its wheel pins protobuf<=3.20.2, which would take our
# onnx back to 1.17, so it goes in without its dependencies (it runs on protobuf 7)
MMDEPLOY_INSTALL = ("pip install --no-deps mmdeploy==1.3.1 && "
                    "pip install aenum multiprocess")
FIXTURE_SIZE = (320, 320)  # (width, height), as mmdeploy's onnx_config.input_shape reads it

# a TopK and a keep cut planted through the deploy config's post_processing alone. The
# YOLOv5 rewriter (mmyolo/deploy/models/dense_heads/yolov5_head.py) takes keep_top_k from
# the model's test_cfg.max_per_img (300) before post_processing.keep_top_k, so keep_top_k 100
# by itself changes nothing; the TensorRT path keeps min(max_output_boxes_per_class,
# keep_top_k), so max_output_boxes_per_class 100 is what makes the keep cut 100.
PLANTED_CUT = {"pre_top_k": 1000, "keep_top_k": 100, "max_output_boxes_per_class": 100}


@dataclass(frozen=True)
class MmdeployRecipe:
    """One file: a deploy config mmyolo ships, and what the test changes in it."""

    deploy_config: str  # file name under mmyolo/.mim/configs/deploy/
    post_processing: Mapping[str, Any] = field(default_factory=dict)
    static_size: bool = False  # input_shape and TensorRT shapes set to FIXTURE_SIZE
    use_efficientnms: bool = False  # mmyolo's switch to TRT::EfficientNMS_TRT

    @property
    def tensorrt(self) -> bool:
        return "tensorrt" in self.deploy_config


MMDEPLOY_RECIPES = {
    # (a) onnxruntime, as shipped: dynamic batch / height / width
    "mmdeploy_ort_dynamic": MmdeployRecipe("detection_onnxruntime_dynamic.py"),
    # (b) TensorRT, static: the 640x640 config at the fixture's 320x320
    "mmdeploy_trt_static": MmdeployRecipe("detection_tensorrt_static-640x640.py",
                                          static_size=True),
    # (c) TensorRT with the planted TopK / keep cut (inside mmdeploy::TRTBatchedNMS)
    "mmdeploy_trt_cut": MmdeployRecipe("detection_tensorrt_static-640x640.py",
                                       post_processing=PLANTED_CUT, static_size=True),
    # the same cut on onnxruntime: real TopK nodes, and a file onnxruntime runs as it is
    "mmdeploy_ort_cut": MmdeployRecipe("detection_onnxruntime_dynamic.py",
                                       post_processing=PLANTED_CUT),
    # use_efficientnms = True (a key of mmyolo's TensorRT deploy configs)
    "mmdeploy_trt_efficientnms": MmdeployRecipe("detection_tensorrt_static-640x640.py",
                                                static_size=True, use_efficientnms=True),
}


@contextlib.contextmanager
def tensorrt_config_on_cpu() -> Iterator[None]:
    """Let a TensorRT deploy config build the model on the CPU.

    mmdeploy.apis.utils.utils.build_task_processor calls check_backend_device, which raises
    "cpu is invalid for the backend tensorrt"; with our CPU-only torch the other way out,
    device "cuda:0", fails at model.to(device). Exporting the graph needs no GPU.
    """
    with mock.patch("mmdeploy.apis.utils.utils.check_backend_device",
                    lambda deploy_cfg, device: None):
        yield


def deploy_config(recipe: MmdeployRecipe) -> Any:
    """The recipe's mmengine Config: mmyolo's shipped deploy config with its changes."""
    from mmengine import Config

    cfg = Config.fromfile(str(mmyolo_config_root() / "deploy" / recipe.deploy_config))
    cfg.codebase_config.post_processing.update(dict(recipe.post_processing))
    if recipe.static_size:
        cfg.onnx_config.input_shape = list(FIXTURE_SIZE)
        shape = [1, 3, FIXTURE_SIZE[1], FIXTURE_SIZE[0]]
        for model_input in cfg.backend_config.get("model_inputs", []):
            model_input.input_shapes.input.update(min_shape=shape, opt_shape=shape,
                                                  max_shape=shape)
    if recipe.use_efficientnms:
        cfg.use_efficientnms = True
    return cfg


def export_with_mmdeploy(recipe: MmdeployRecipe, out_path: Path) -> float:
    """Export the fixture with `mmdeploy.apis.torch2onnx` to `out_path`; seconds taken.

    The image only drives the test pipeline (resize, letterbox) to a 320x320 tensor; the
    graph does not depend on its pixels.
    """
    import numpy as np
    from mmdeploy.apis import torch2onnx
    from mmengine import Config

    image = np.zeros((FIXTURE_SIZE[1], FIXTURE_SIZE[0], 3), np.uint8)
    start = time.perf_counter()
    with contextlib.ExitStack() as patches:
        patches.enter_context(torchscript_onnx_export())
        if recipe.tensorrt:
            patches.enter_context(tensorrt_config_on_cpu())
        torch2onnx(image, str(out_path.parent), out_path.name, deploy_config(recipe),
                   Config.fromfile(str(FIXTURE_CONFIG)), str(FIXTURE_CHECKPOINT),
                   device="cpu")
    return time.perf_counter() - start
