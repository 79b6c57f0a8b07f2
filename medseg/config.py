"""Experiment configuration: values from the MONAI bundle, command-line overrides,
the resolved copy.

The experiment is defined by a MONAI bundle (default: ``brats_unet3d``, shipped
in ``bundles/`` and installed as ``medseg.bundles``). Its ``configs/train.json``
holds every value of the ``full`` recipe (seed, model, data, train, infer) and
wires medseg's builders with ``_target_``; a preset is an overlay file next to
it (``configs/cpu.json``). This module reads those values: it is the one place
that turns bundle + preset + ``--set`` overrides into the plain nested dict the
Python code consumes (written next to results, stored in checkpoints). No value
lives here.

Presets of the default bundle:

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

__all__ = ["BUNDLE", "VALUE_KEYS", "bundle_dir", "presets", "bundle_files", "bundle_values",
           "experiment", "LATER_KEYS", "resolve_config", "apply_overrides", "load_config", "parse_override",
           "config_hash"]

#: The default experiment definition.
BUNDLE = "brats_unet3d"
#: Top-level keys of a bundle's train config that hold the experiment's values.
VALUE_KEYS = ("preset", "seed", "model", "data", "train", "infer")
#: Config files of a bundle that are not presets.
_NOT_PRESETS = {"train", "evaluate", "inference", "multi_gpu_train", "metadata"}


def bundle_dir(bundle: str | Path | None = None) -> Path:
    """A bundle folder: None → the default bundle shipped with medseg; an existing
    folder → that folder; otherwise the name of a bundle shipped with medseg."""
    if bundle is not None and Path(bundle).is_dir():
        path = Path(bundle)
    else:
        from importlib.resources import files
        root = Path(str(files("medseg.bundles")))
        path = root / str(bundle or BUNDLE)
        if not path.is_dir():
            shipped = sorted(p.name for p in root.iterdir() if (p / "configs" / "train.json").is_file())
            raise MedsegError(f"bundle {bundle}: not a folder, nor a bundle shipped with medseg "
                              f"({', '.join(shipped)}); pass the path of a MONAI bundle folder")
    if not (path / "configs" / "train.json").is_file():
        raise MedsegError(f"bundle {path}: no configs/train.json; expected a MONAI bundle folder "
                          f"(configs/train.json, configs/metadata.json, ...) like bundles/{BUNDLE}")
    return path


def presets(bundle: str | Path | None = None) -> list[str]:
    """Preset names of a bundle: ``full`` (train.json alone) and each overlay
    ``configs/<name>.json`` that sets ``"preset": "<name>"``."""
    root = bundle_dir(bundle) / "configs"
    names = ["full"]
    for f in sorted(root.glob("*.json")):
        if f.stem not in _NOT_PRESETS:
            names.append(f.stem)
    return names


def bundle_files(preset: str = "full", bundle: str | Path | None = None) -> list[Path]:
    """The config files that define `preset`: ``train.json`` [+ ``<preset>.json``]."""
    root = bundle_dir(bundle)
    known = presets(root)
    if preset not in known:
        raise MedsegError(f"unknown preset {preset!r} for bundle {root}; expected one of "
                          f"{', '.join(known)} (a preset is configs/<name>.json in the bundle)")
    files = [root / "configs" / "train.json"]
    if preset != "full":
        files.append(root / "configs" / f"{preset}.json")
    return files


def bundle_values(preset: str = "full", bundle: str | Path | None = None) -> dict:
    """The experiment values (`VALUE_KEYS`) of a bundle preset, as MONAI merges them."""
    from monai.bundle import ConfigParser
    files = bundle_files(preset, bundle)
    parser = ConfigParser()
    try:
        parser.read_config([str(f) for f in files])
        values = {k: copy.deepcopy(parser.get_parsed_content(k, instantiate=False))
                  for k in VALUE_KEYS if k in parser}
    except (ValueError, KeyError, OSError) as exc:
        raise MedsegError(f"bundle config {', '.join(map(str, files))}: could not read the experiment "
                          f"values ({exc})") from None
    missing = [k for k in VALUE_KEYS if k not in values]
    if missing:
        raise MedsegError(f"bundle config {files[0]}: missing top-level values {missing}; a medseg "
                          f"bundle's train.json sets {', '.join(VALUE_KEYS)}")
    if values["preset"] != preset:
        raise MedsegError(f"{files[-1]}: sets preset {values['preset']!r}, expected {preset!r} "
                          "(a preset file must name itself)")
    return experiment(**values)


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k != "args":
            out |= _keys(v, prefix + k + ".")
    return out


#: Keys added after configs were first written, with the value that reproduces how
#: a config written before them behaved: filled in when absent, so every older
#: ``config.json`` and checkpoint still loads, compares and resumes.
LATER_KEYS = {("train", "modality_dropout"): 0.0, ("train", "ddp_timeout_min"): 30, ("train", "init_from"): None,
              ("train", "modality_dropout_weight"): 1.0,
              ("data", "augment"): "auto", ("data", "task"): None, ("train", "grad_checkpoint"): False,
              ("train", "loss"): {"name": "dice_ce", "dice_weight": 1.0, "ce_weight": 1.0, "focal_weight": 1.0,
                                  "focal_alpha": 0.25, "focal_gamma": 2.0, "class_weights": "none"},
              ("train", "distill"): {"teacher": None, "weight": 0.5, "teacher_tta": False}}


def experiment(preset: str, seed: int, model: dict, data: dict, train: dict, infer: dict) -> dict:
    """The experiment dict that training consumes, checked against the default
    bundle's keys: a misspelt or missing key is an error, never a silent default
    (except LATER_KEYS in configs older than them). The bundle's ``experiment``
    entry calls this."""
    cfg = copy.deepcopy({"preset": preset, "seed": seed, "model": model, "data": data, "train": train,
                         "infer": infer})
    for (section, key), value in LATER_KEYS.items():
        if isinstance(cfg.get(section), dict):
            cfg[section].setdefault(key, value)
    ref = _reference_keys()
    have = _keys(cfg)
    unknown, missing = sorted(have - ref), sorted(ref - have)
    if unknown or missing:
        raise MedsegError(
            "experiment values do not match the bundle schema: "
            + (f"unknown keys {unknown} (misspelt?)" if unknown else "")
            + ("; " if unknown and missing else "")
            + (f"missing keys {missing}" if missing else "")
            + f"; valid keys: {', '.join(sorted(ref))}")
    if not isinstance(model.get("name"), str) or not isinstance(model.get("args"), dict):
        raise MedsegError(f"model {model!r}: expected {{'name': str, 'args': {{...}}}}")
    return copy.deepcopy(cfg)


_REF: set[str] | None = None


def _reference_keys() -> set[str]:
    """Key paths of the default bundle's values (``model.args`` is free-form)."""
    global _REF
    if _REF is None:
        raw = json.loads((bundle_dir(None) / "configs" / "train.json").read_text())
        _REF = _keys({k: raw[k] for k in VALUE_KEYS})
    return _REF


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


def resolve_config(preset: str = "full", overrides: Iterable[str] | dict | None = None,
                   bundle: str | Path | None = None) -> dict:
    """Bundle values of `preset` ← overrides (``"a.b=value"`` strings or a nested dict).

    An override of a key that does not exist is an error listing the valid keys
    (a typo must not silently train with the default).
    """
    cfg = bundle_values(preset, bundle)
    if isinstance(overrides, dict):
        return experiment(**_merge(cfg, overrides))
    return experiment(**apply_overrides(cfg, overrides or ()))


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


def load_config(path: str | Path, bundle: str | Path | None = None) -> dict:
    """A ``config.json`` written by a medseg run → the full config (a partial one gets
    its missing keys from its preset in the bundle)."""
    try:
        base = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise MedsegError(f"config {path}: not a readable JSON file ({exc})") from None
    if not isinstance(base, dict) or not isinstance(base.get("preset"), str):
        raise MedsegError(f"config {path}: not a medseg config (expected a 'preset' key); use a "
                          "config.json written by `medseg train`/`cv`")
    unknown = sorted(set(base) - set(VALUE_KEYS))
    if unknown:
        raise MedsegError(f"config {path}: unknown keys {unknown}; valid: {list(VALUE_KEYS)}")
    if set(base) == set(VALUE_KEYS):
        # Complete (as every run writes it): the values stand on their own, whatever
        # bundle and preset produced them.
        return experiment(**base)
    return resolve_config(base["preset"], {k: v for k, v in base.items() if k != "preset"}, bundle)


def config_hash(obj: Any) -> str:
    """Short stable hash of a JSON-able object (cache keys, run identity)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]
