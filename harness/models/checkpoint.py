"""Loading mmengine checkpoints without blind unpickling, checking they fit a model, and
building a detector from its config with them (`build_detector`, every model source).

`torch.load(weights_only=True)` refuses every class not on an allow-list; ours names only
what mmengine writes into checkpoints (numpy arrays and scalars inside its message hub,
HistoryBuffer). Anything else is refused with the class named.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Union

from harness.errors import UserError, first_line


def _allowed_globals() -> list[Any]:
    import numpy as np

    allowed: list[Any] = [np.ndarray, np.dtype]
    for mod_name in ("numpy.core.multiarray", "numpy._core.multiarray"):
        try:
            mod = __import__(mod_name, fromlist=["_reconstruct", "scalar"])
        except ImportError:
            continue
        allowed += [mod._reconstruct, mod.scalar]
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    try:
        from mmengine.logging.history_buffer import HistoryBuffer

        allowed.append(HistoryBuffer)
    except ImportError:  # mmengine absent: plain state dicts still load
        pass
    return allowed


def load_checkpoint_file(path: Union[str, Path]) -> dict[str, Any]:
    """Read a checkpoint safely. Returns {'state_dict': ..., 'meta': ...} (meta may be {})."""
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise UserError(
                f"checkpoint {p} contains a pickled object of type {found.group(1)}, which "
                "harness does not unpickle for safety; re-save it with only "
                "{'state_dict': model.state_dict()}") from None
        raise UserError(f"checkpoint {p} is corrupt or not a PyTorch checkpoint") from None
    except Exception as exc:  # torch's unpickler raises many types (KeyError, ...) on garbage
        raise UserError(f"checkpoint {p} is corrupt or truncated ({type(exc).__name__}); "
                        "re-download or re-save it") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {p} holds a {type(ckpt).__name__}, not a state dict")
    state = ckpt.get("state_dict", ckpt.get("model", ckpt))
    if not isinstance(state, dict) or not state or not all(
            isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {p} has no state_dict of tensors")
    # DataParallel / DDP prefixes
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    return {"state_dict": state, "meta": meta}


def checkpoint_classes(meta: dict[str, Any]) -> Union[tuple[str, ...], None]:
    classes = (meta.get("dataset_meta") or {}).get("classes")
    return tuple(classes) if classes else None


def check_state_dict_fits(model: Any, state: dict[str, Any], ckpt_path: Union[str, Path],
                          cfg_path: Union[str, Path], num_classes: int,
                          ckpt_classes: Union[tuple[str, ...], None]) -> None:
    """Refuse, with one line, a checkpoint whose keys or shapes do not fit the model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape))
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise UserError(
            f"checkpoint {ckpt_path} does not fit config {cfg_path}: {len(missing)} key(s) "
            f"missing, {len(unexpected)} unexpected (first: {first}); is it the checkpoint "
            "of this config?")
    if ckpt_classes is not None and len(ckpt_classes) != num_classes:
        raise UserError(
            f"class count mismatch: checkpoint {ckpt_path} was trained on {len(ckpt_classes)} "
            f"classes, config {cfg_path} has num_classes={num_classes}; use the config the "
            "checkpoint was trained with")
    if mismatched:
        k, got, want = mismatched[0]
        raise UserError(
            f"checkpoint {ckpt_path} does not fit config {cfg_path}: {len(mismatched)} "
            f"tensor(s) differ in shape, first {k}: {got} in checkpoint vs {want} in model "
            f"(the config has num_classes={num_classes}; a different class count or model "
            "size would do this)")


def class_names_of(cfg: Any, meta: dict, num_classes: int) -> tuple[str, ...]:
    """Class names from the config's metainfo, else the checkpoint's, else COCO's for 80
    classes, else `class_<i>`."""
    for where in (cfg.get("metainfo"),
                  cfg.get("test_dataloader", {}).get("dataset", {}).get("metainfo"),
                  cfg.get("train_dataloader", {}).get("dataset", {}).get("metainfo")):
        if where and where.get("classes"):
            return tuple(where["classes"])
    from_ckpt = checkpoint_classes(meta)
    if from_ckpt:
        return from_ckpt
    if num_classes == 80:
        from mmdet.datasets import CocoDataset

        return tuple(CocoDataset.METAINFO["classes"])
    return tuple(f"class_{i}" for i in range(num_classes))


def build_detector(registry: Any, cfg: Any, cfg_path: Union[str, Path],
                   ckpt_path: Union[str, Path, None], device: str, seed: int,
                   framework: str, num_classes_of: Any) -> tuple[Any, tuple[str, ...]]:
    """Build `cfg.model` with a framework's registry and load `ckpt_path` into it (checked
    against the config first), or, without one, the framework's own random initialisation
    (seeded; `Pretrained` init_cfgs dropped, so nothing is downloaded). Returns the module in
    eval mode on `device` and the class names. num_classes_of(module) → the class count."""
    import torch

    torch.manual_seed(seed)
    try:
        module = registry.build(cfg.model)
    except Exception as exc:
        raise UserError(f"config {cfg_path} does not build an {framework} model: "
                        f"{first_line(exc)}") from None
    num_classes = int(num_classes_of(module))
    meta: dict = {}
    if ckpt_path is None:
        # RTMDet's configs name an ImageNet checkpoint in init_cfg
        for sub in module.modules():
            init_cfg = getattr(sub, "init_cfg", None)
            if isinstance(init_cfg, dict) and init_cfg.get("type") == "Pretrained":
                sub.init_cfg = None
        module.init_weights()
    else:
        ckpt = load_checkpoint_file(ckpt_path)
        meta = ckpt["meta"]
        check_state_dict_fits(module, ckpt["state_dict"], ckpt_path, cfg_path, num_classes,
                              checkpoint_classes(meta))
        module.load_state_dict(ckpt["state_dict"], strict=True)
    module.cfg = cfg  # mmdet.apis.inference_detector reads model.cfg
    module.to(device).eval()
    return module, class_names_of(cfg, meta, num_classes)
