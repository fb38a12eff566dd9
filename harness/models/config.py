"""Reading an mmengine config file into a Config, with one line for a missing or broken file;
and choosing the model source a config needs (`load_model_source`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from harness.errors import UserError, first_line


def read_config_file(cfg_path: Union[str, Path]) -> Any:
    """The mmengine Config of `cfg_path`; UserError for a missing file or one mmengine cannot
    read. Says nothing about what kind of model it describes."""
    from mmengine.config import Config

    p = Path(cfg_path)
    if not p.is_file():
        raise UserError(f"config not found: {p}")
    try:
        return Config.fromfile(str(p))
    except Exception as exc:  # mmengine raises many types for a bad config
        raise UserError(f"cannot read config {p}: {first_line(exc)}") from None


def load_model_source(cfg_path: Union[str, Path], ckpt_path: Union[str, Path, None] = None,
                      device: str = "cpu", seed: int = 0) -> Any:
    """The ModelSource for a config: mmdet's two-stage source for a detector with an RPN and
    an RoI head, else the mmyolo source (which says in one line what it does not support).
    Either path may name a file shipped in the package (`harness:fixture/...`)."""
    from harness.experiment import resolve_path
    from harness.models.mmdet_twostage import is_two_stage, load_twostage_model
    from harness.models.mmyolo import load_mmyolo_model

    cfg_path = resolve_path(cfg_path)
    ckpt_path = None if ckpt_path is None else resolve_path(ckpt_path)
    cfg = read_config_file(cfg_path)
    if is_two_stage(cfg.get("model")):
        return load_twostage_model(cfg, cfg_path, ckpt_path, device, seed)
    return load_mmyolo_model(cfg_path, ckpt_path, device, seed)
