"""mmyolo's own test path, as the ground truth the harness's model source is checked
against: mmcv's Compose of the config's test pipeline, the model's data preprocessor, and
`model.test_step`."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def mmyolo_pipeline(cfg: Any) -> Any:
    from mmcv.transforms import Compose
    from mmyolo.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    steps = [dict(t) for t in cfg.test_dataloader.dataset.pipeline
             if "LoadAnnotations" not in t["type"]]
    return Compose(steps)


def mmyolo_inputs(cfg: Any, module: Any, path: Path) -> tuple[Any, Any]:
    """(network input tensor (1,3,H,W), data sample) as mmyolo builds them for test_step."""
    data = mmyolo_pipeline(cfg)(dict(img_path=str(path), img_id=0))
    batch = module.data_preprocessor(
        dict(inputs=[data["inputs"]], data_samples=[data["data_samples"]]), training=False)
    return batch["inputs"], batch["data_samples"][0]


def mmyolo_test_step(cfg: Any, module: Any, path: Path) -> Any:
    """pred_instances of `model.test_step` on one image file."""
    import torch

    data = mmyolo_pipeline(cfg)(dict(img_path=str(path), img_id=0))
    with torch.no_grad():
        out = module.test_step(dict(inputs=[data["inputs"]], data_samples=[data["data_samples"]]))
    return out[0].pred_instances
