"""The optional brain extractors of `medseg predict --raw` (`--brain-extractor hd-bet`,
`--brain-extractor synthstrip`; `medseg.raw.prepare._external_brain`), run against
fake ``hd-bet`` / ``mri_synthstrip`` commands on PATH that take the real tools'
flags (HD-BET 2.x: ``-i -o -device --disable_tta --save_bet_mask --no_bet_image``,
the mask in ``<OUT>_bet.nii.gz``; SynthStrip: ``-i -o -m``) and write a known mask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.raw import register as rg
from medseg.raw.prepare import _external_brain

# The argument parsers of the real tools, as far as medseg uses them (stdlib only):
# an unknown flag is an argparse error (exit 2), as with the real commands.
HD_BET = r'''#!/usr/bin/env python3
import argparse, json, os, shutil, sys
p = argparse.ArgumentParser()
p.add_argument("-i", "--input", required=True)
p.add_argument("-o", "--output")
p.add_argument("-device", default="cuda")
p.add_argument("--disable_tta", action="store_true")
p.add_argument("--save_bet_mask", action="store_true")
p.add_argument("--no_bet_image", action="store_true")
p.add_argument("--verbose", action="store_true")
a = p.parse_args()
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.json"), "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd()}) + "\n")
assert os.path.isfile(a.input), a.input
assert a.output.endswith(".nii.gz"), "Output file must end with .nii.gz"
if a.save_bet_mask:            # HD-BET 2.x deletes the mask unless asked to keep it
    shutil.copy(os.path.join(here, "known_mask.nii.gz"), a.output[:-7] + "_bet.nii.gz")
if not a.no_bet_image:
    shutil.copy(a.input, a.output)
'''

SYNTHSTRIP = r'''#!/usr/bin/env python3
import argparse, json, os, shutil, sys
p = argparse.ArgumentParser()
p.add_argument("-i", "--image", required=True)
p.add_argument("-o", "--out")
p.add_argument("-m", "--mask")
p.add_argument("-d", "--sdt")
p.add_argument("-g", "--gpu", action="store_true")
p.add_argument("-b", "--border", default=1, type=float)
p.add_argument("-t", "--threads", type=int)
p.add_argument("--no-csf", action="store_true")
p.add_argument("--model")
a = p.parse_args()
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.json"), "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd()}) + "\n")
if not (a.out or a.mask or a.sdt):
    sys.exit("Must provide at least one -o, -m, or -d output flag.")
if a.mask:
    shutil.copy(os.path.join(here, "known_mask.nii.gz"), a.mask)
if a.out:
    shutil.copy(a.image, a.out)
'''

FAILING = r'''#!/usr/bin/env python3
import sys
sys.stdout.write("If you are using this tool, please cite ...\n")
sys.stderr.write("Traceback (most recent call last):\n" + "  noise\n" * 200
                 + "RuntimeError: weights could not be downloaded (no network)\n")
sys.exit(3)
'''

SILENT = "#!/usr/bin/env python3\nimport sys\nsys.exit(0)\n"

EXE = {"hd-bet": "hd-bet", "synthstrip": "mri_synthstrip"}


def _install(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / name
    exe.write_text(text)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def _t1ce() -> sitk.Image:
    """A small oblique, anisotropic T1ce-like image (the grid the mask must come back on)."""
    rng = np.random.default_rng(0)
    vol = rng.uniform(50, 100, (20, 18, 12)).astype(np.float32)
    c, s = np.cos(0.2), np.sin(0.2)
    affine = np.array([[1.1 * c, -1.1 * s, 0, -10.0], [1.1 * s, 1.1 * c, 0, 5.0],
                       [0, 0, 2.5, -12.0], [0, 0, 0, 1]])
    return rg.to_sitk(vol, affine)


def _known_mask(t1ce: sitk.Image) -> np.ndarray:
    """A sphere on the T1ce's voxel grid, in SimpleITK's (z, y, x) order."""
    z, y, x = np.indices(sitk.GetArrayViewFromImage(t1ce).shape)
    return (((x - 10) / 6.0) ** 2 + ((y - 9) / 5.0) ** 2 + ((z - 6) / 4.0) ** 2 <= 1).astype(np.uint8)


@pytest.fixture
def fake_path(tmp_path, monkeypatch):
    """A folder put first on PATH, for the fake commands."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return bin_dir


@pytest.mark.parametrize("tool", ["hd-bet", "synthstrip"])
def test_external_brain_returns_the_tools_mask_on_the_t1ce_grid(tool, fake_path, tmp_path):
    t1ce = _t1ce()
    known = _known_mask(t1ce)
    # The tool writes the mask on its input's grid (both tools do): uint8, the T1ce's header.
    mask_img = sitk.GetImageFromArray(known)
    mask_img.CopyInformation(t1ce)
    sitk.WriteImage(mask_img, str(fake_path / "known_mask.nii.gz"))
    _install(fake_path, EXE[tool], HD_BET if tool == "hd-bet" else SYNTHSTRIP)
    work = tmp_path / "work"
    work.mkdir()

    out = _external_brain(tool, t1ce, work)

    assert out.GetSize() == t1ce.GetSize()
    assert np.allclose(out.GetSpacing(), t1ce.GetSpacing())
    assert np.allclose(out.GetOrigin(), t1ce.GetOrigin())
    assert np.allclose(out.GetDirection(), t1ce.GetDirection())
    assert out.GetPixelID() == sitk.sitkUInt8
    got = sitk.GetArrayFromImage(out)
    assert known.sum() > 50 and np.array_equal(got, known)

    calls = [json.loads(line) for line in (fake_path / "calls.json").read_text().splitlines()]
    assert len(calls) == 1
    argv = calls[0]["argv"]
    src = argv[argv.index("-i") + 1]
    assert Path(src).parent == work and src.endswith(".nii.gz")
    if tool == "hd-bet":
        # HD-BET 2.x on the CPU: keep the mask (else it is deleted), skip the brain image.
        assert argv[argv.index("-device") + 1] == "cpu"
        assert {"--save_bet_mask", "--no_bet_image", "--disable_tta"} <= set(argv)
        assert argv[argv.index("-o") + 1].endswith(".nii.gz")
    else:
        assert Path(argv[argv.index("-m") + 1]).parent == work


@pytest.mark.parametrize("tool", ["hd-bet", "synthstrip"])
def test_missing_command_says_which_and_suggests_builtin(tool, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(MedsegError) as exc:
        _external_brain(tool, _t1ce(), tmp_path)
    msg = str(exc.value)
    assert repr(EXE[tool]) in msg and "not on PATH" in msg
    assert "--brain-extractor builtin" in msg


@pytest.mark.parametrize("tool", ["hd-bet", "synthstrip"])
def test_failing_command_reports_exit_status_and_stderr_tail(tool, fake_path, tmp_path):
    _install(fake_path, EXE[tool], FAILING)
    with pytest.raises(MedsegError) as exc:
        _external_brain(tool, _t1ce(), tmp_path)
    msg = str(exc.value)
    assert f"--brain-extractor {tool} failed" in msg and "exit 3" in msg
    assert "RuntimeError: weights could not be downloaded (no network)" in msg
    assert "please cite" not in msg                          # stderr, not stdout
    assert len(msg) < 1200                                   # the tail, not the whole traceback


@pytest.mark.parametrize("tool", ["hd-bet", "synthstrip"])
def test_command_that_writes_no_mask_is_an_error(tool, fake_path, tmp_path):
    _install(fake_path, EXE[tool], SILENT)
    with pytest.raises(MedsegError, match="wrote no mask"):
        _external_brain(tool, _t1ce(), tmp_path)


def test_hd_bet_brain_image_is_never_taken_for_the_mask(fake_path, tmp_path):
    """An HD-BET that leaves only the brain-extracted image (as 2.x does without
    --save_bet_mask): that intensity image is not a mask, and medseg must not
    threshold it into one."""
    image_only = ("#!/usr/bin/env python3\nimport shutil, sys\n"
                  "a = sys.argv[1:]\nshutil.copy(a[a.index('-i') + 1], a[a.index('-o') + 1])\n")
    _install(fake_path, "hd-bet", image_only)
    with pytest.raises(MedsegError, match="wrote no mask"):
        _external_brain("hd-bet", _t1ce(), tmp_path)
    assert (tmp_path / "brain.nii.gz").is_file()
