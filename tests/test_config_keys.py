"""No dead settings: every value key of the bundle's experiment sections is read
by medseg code (a key no code reads is a setting that silently does nothing)."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "brats_unet3d" / "configs"
SECTIONS = ("data", "train", "infer")


#: How code reads a config value: cfg["key"], cfg.get("key"), "key" in cfg (a literal
#: "key": value written into a record is not a read).
_READ = r"""\[["']{key}["']\]|\.get\(["']{key}["']|["']{key}["'] in """


def _leaf_keys(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and not any(key.startswith("_") for key in v):
            yield from _leaf_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _code() -> str:
    # config.py only loads and validates values: reading a key there does not use it
    return "\n".join(p.read_text() for p in (REPO / "medseg").rglob("*.py") if p.name != "config.py")


def test_every_experiment_value_is_read_by_code():
    code = _code()
    unread = []
    for path in sorted(CONFIGS.glob("*.json")):
        cfg = json.loads(path.read_text())
        for section in SECTIONS:
            if not isinstance(cfg.get(section), dict):
                continue
            for key in _leaf_keys(cfg[section]):
                leaf = key.split(".")[-1]
                if not re.search(_READ.format(key=re.escape(leaf)), code):
                    unread.append(f"{path.name}: {section}.{key}")
    assert not unread, "keys no medseg code reads:\n" + "\n".join(unread)


def test_the_walk_finds_a_dead_key(tmp_path):
    # the check itself can fail: a key that no code names is reported
    code = _code() + '\nblend_description = {"no_such_setting_xyz": 1}\n'
    assert not re.search(_READ.format(key="no_such_setting_xyz"), code)
    assert re.search(_READ.format(key="no_such_setting_xyz"), code + 'x = cfg["no_such_setting_xyz"]')
