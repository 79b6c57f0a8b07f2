"""Experiment configuration: presets, command-line overrides, the resolved copy.

A config is a plain nested dict of JSON values, so that it can be written next
to the results, stored in checkpoints (safe for `torch.load(weights_only=True)`)
and, later, held by bundle configs. Python code reads it; it computes nothing.

Presets:

- ``full``: the GPU recipe: nnU-Net-size `unet3d` (32…320 filters), 1 mm
  spacing, 128³ patches, batch 2, 250 iterations × 300 epochs.
- ``cpu``: trains in minutes on 2 cores: narrow `unet3d` (16…128), 2.5 mm
  spacing (BraTS 240×240×155 → 96×96×62), 48³ patches, bf16 autocast.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from medseg.errors import MedsegError

__all__ = ["PRESETS", "DEFAULTS", "resolve_config", "apply_overrides", "load_config",
           "parse_override", "config_hash"]

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "model": {"name": "unet3d", "args": {"preset": "full"}},
    "data": {
        "spacing": [1.0, 1.0, 1.0],
        "cache": "memory",        # "memory" (MONAI CacheDataset) or "disk" (PersistentDataset)
        "num_workers": 2,
    },
    "train": {
        "epochs": 300,
        "iters_per_epoch": 250,
        "batch_size": 2,
        "patch": [128, 128, 128],
        "pos_neg": [2.0, 1.0],    # tumour-centred : random patches
        "optimizer": "sgd",       # "sgd" (Nesterov, nnU-Net) or "adamw"
        "lr": 0.01,
        "weight_decay": 3e-5,
        "momentum": 0.99,
        "schedule": "poly",       # "poly" (nnU-Net, exponent 0.9) or "cosine"
        "warmup_epochs": 0,
        "grad_clip": 12.0,
        "amp": True,              # mixed precision (autocast)
        "amp_dtype": "bfloat16",  # bfloat16 (CPU or CUDA) or float16 (CUDA, with loss scaling)
        "channels_last": False,
        "deep_supervision": True,
        "val_every": 10,
        "val_max_cases": 0,       # 0 = all validation cases
    },
    "infer": {
        "overlap": 0.5,
        "sw_batch_size": 2,
        "blend": "gaussian",
        "threshold": 0.5,
    },
}

PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    "cpu": {
        "model": {"name": "unet3d", "args": {"preset": "cpu"}},
        # Data loading costs 20-30 ms a batch here; workers would only compete with
        # the two cores that compute.
        "data": {"spacing": [2.5, 2.5, 2.5], "num_workers": 0},
        # 48³ patches: 0.22 s an iteration on 2 cores (64³: 0.7 s); 48³ at 2.5 mm = 120 mm.
        "train": {"epochs": 40, "iters_per_epoch": 16, "patch": [48, 48, 48],
                  "optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-4,
                  "schedule": "cosine", "warmup_epochs": 2, "val_every": 20},
        "infer": {"sw_batch_size": 1},
    },
}


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, val in update.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict) and key != "args":
            out[key] = _merge(out[key], val)
        else:
            out[key] = copy.deepcopy(val)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=5"`` → (["train", "epochs"], 5). Values are JSON, else strings."""
    if "=" not in text:
        raise MedsegError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def resolve_config(preset: str = "full", overrides: Iterable[str] | dict | None = None) -> dict:
    """DEFAULTS ← PRESETS[preset] ← overrides (``"a.b=value"`` strings or a nested dict).

    An override of a key that does not exist is an error listing the valid keys
    (a typo must not silently train with the default).
    """
    if preset not in PRESETS:
        raise MedsegError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    cfg = _merge(DEFAULTS, PRESETS[preset])
    cfg["preset"] = preset
    if isinstance(overrides, dict):
        return _merge(cfg, overrides)
    return apply_overrides(cfg, overrides or ())


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """A copy of `cfg` with ``"a.b=value"`` overrides applied; unknown keys are errors."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        path, value = parse_override(text)
        node = cfg
        for i, part in enumerate(path[:-1]):
            if not isinstance(node.get(part), dict):
                raise MedsegError(f"override {text!r}: unknown key {'.'.join(path[:i + 1])!r}; "
                                  f"valid keys here: {', '.join(sorted(node))}")
            node = node[part]
        last = path[-1]
        # model.args.* is free-form: it is passed to the network builder, which checks it.
        if last not in node and path[:2] != ["model", "args"]:
            raise MedsegError(f"override {text!r}: unknown key {'.'.join(path)!r}; "
                              f"valid keys here: {', '.join(sorted(node))}")
        node[last] = value
    return cfg


def load_config(path: str | Path) -> dict:
    """A ``config.json`` written by a medseg run → the full config (missing keys from
    its preset's defaults)."""
    try:
        base = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise MedsegError(f"config {path}: not a readable JSON file ({exc})") from None
    if not isinstance(base, dict) or base.get("preset") not in PRESETS:
        raise MedsegError(f"config {path}: not a medseg config (expected a 'preset' key, one of "
                          f"{', '.join(PRESETS)}); use a config.json written by `medseg train`/`cv`")
    unknown = sorted(set(base) - set(DEFAULTS) - {"preset"})
    if unknown:
        raise MedsegError(f"config {path}: unknown keys {unknown}; valid: {sorted(DEFAULTS)}")
    return resolve_config(base["preset"], {k: v for k, v in base.items() if k != "preset"})


def config_hash(obj: Any) -> str:
    """Short stable hash of a JSON-able object (cache keys, run identity)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]
