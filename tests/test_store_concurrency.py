"""The preprocessed store under concurrency and its checks (medseg.data.preprocessed):
processes rebuilding the same stale entries at once while a trainer reads them,
training start checking entries without reading their bytes, and `medseg data
verify` finding what only a full read can find."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from medseg.cli import main
from medseg.config import resolve_config
from medseg.data.preprocessed import ensure_store
from medseg.train import fold_data, prepare_store

from conftest import TINY_TRAIN

SPACING = (6.0, 6.0, 6.0)

def _builder(args: dict, go, meet, log: str) -> None:
    """A builder process (forked: it starts at once, with everything imported).

    It waits for the start signal, so that the builders reach the stale entries
    together, then runs ensure_store; its messages and any error go to `log`.
    Two races are made certain instead of likely:
    * the builders' first renames meet (a barrier, 2 s at most, on the first
      os.replace of each): the moment at which a builder replacing the entry in
      two renames found it gone and failed with "cannot write ... free space";
    * deleting a replaced entry takes 0.3 s, as on a network file system deleting
      a large case: the window in which a store that deletes the old entry before
      the new one is in place shows a reader nothing."""
    import shutil
    import threading
    import traceback
    rmtree, replace = shutil.rmtree, os.replace
    first = [True]

    def slow_rmtree(path, *a, **k):
        time.sleep(0.3)
        return rmtree(path, *a, **k)

    def meeting_replace(src, dst):
        if first[0]:
            first[0] = False
            try:
                meet.wait(2)
            except threading.BrokenBarrierError:
                pass
        return replace(src, dst)

    shutil.rmtree, os.replace = slow_rmtree, meeting_replace
    with open(log, "w") as out:
        go.wait(30)
        try:
            ensure_store(args["cases"], args["root"], SPACING, args["channels"], args["convention"], jobs=1,
                         print_fn=lambda s: print(s, file=out, flush=True))
        except BaseException:  # noqa: BLE001 - reported to the test through the log and exit code
            out.write(traceback.format_exc())
            out.flush()
            os._exit(1)
    os._exit(0)


def quiet(_: str) -> None:
    pass


def _cases(split, cases=6):
    dl, root = split("brats2023", cases)
    data = fold_data(dl, root, None)
    return data, sorted(data.train, key=lambda c: c["id"])


def _entry_mtime(entry: Path) -> int:
    return (entry / "entry.json").stat().st_mtime_ns


def _incomplete(entry: Path) -> str | None:
    """What a trainer opening `entry` now would miss: entry.json, a file, or a file's
    recorded size; None when it finds a complete entry."""
    try:
        rec = json.loads((entry / "entry.json").read_text())
    except (OSError, ValueError) as exc:
        return f"entry.json: {exc}"
    for name, f in rec["files"].items():
        try:
            size = (entry / name).stat().st_size
        except OSError as exc:
            return f"{name}: {exc}"
        if size != f["bytes"]:
            return f"{name}: {size} bytes, recorded {f['bytes']}"
    try:
        img = np.load(entry / "image.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        return f"image.npy: {exc}"
    if list(img.shape) != rec["files"]["image.npy"]["shape"]:
        return f"image.npy: shape {img.shape}"
    return None


def _touch(path: str | Path) -> None:
    """Make a source file newer: its entry becomes stale."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_concurrent_rebuilds_of_a_stale_entry_succeed_and_readers_never_see_a_gap(split, tmp_path):
    """Two processes rebuild the same stale entries at the same moment (their
    renames meeting, see `_builder`) while a reader polls them: both succeed (no
    false "free space"/"cannot write" error), every entry is rebuilt once, and the
    reader never finds one missing or partial."""
    data, cases = _cases(split)
    pp = tmp_path / "pp"
    store = ensure_store(cases, pp, SPACING, data.channels, data.convention, jobs=1, print_fn=quiet)
    victims = [c["id"] for c in cases[:3]]
    before = {v: _entry_mtime(store.path / v) for v in victims}
    for c in cases[:3]:
        _touch(c["image"][0])

    import multiprocessing as mp
    ctx = mp.get_context("fork")
    go, meet = ctx.Event(), ctx.Barrier(2)
    args = {"cases": cases, "root": str(pp), "channels": data.channels, "convention": data.convention}
    logs = [str(tmp_path / f"builder_{k}.log") for k in range(2)]
    procs = [ctx.Process(target=_builder, args=(args, go, meet, log)) for log in logs]
    for p in procs:                      # forked before the reader thread starts
        p.start()

    seen: list[str] = []
    polls = [0]
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            for v in victims:
                why = _incomplete(store.path / v)
                if why:
                    seen.append(f"{v}: {why}")
                polls[0] += 1

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    go.set()
    for p in procs:
        p.join(60)
    stop.set()
    t.join()
    outs = [Path(log).read_text() for log in logs]

    for p, out in zip(procs, outs):
        assert p.exitcode == 0, f"a builder failed:\n{out[-3000:]}"
        assert "free space" not in out and "cannot write" not in out, out
    assert not seen, f"the reader found {len(seen)} incomplete entries during the rebuild, e.g. {seen[:3]}"
    assert polls[0] > 20, "the reader did not run during the rebuild"
    after = {v: _entry_mtime(store.path / v) for v in victims}
    assert all(after[v] != before[v] for v in victims), "the stale entries were not rebuilt"
    # every stale entry was built once in all: the second process found it done
    built = sum(int(line.split()[1]) for out in outs for line in out.splitlines()
                if line.startswith("preprocessed ") and " case(s) in " in line)
    assert built == len(victims), outs
    assert ensure_store(cases, pp, SPACING, data.channels, data.convention, jobs=1, print_fn=quiet).path == store.path
    assert not [p for p in store.path.iterdir() if p.name.startswith(".tmp")]


def test_training_start_checks_entries_without_reading_their_bytes(split, tmp_path, monkeypatch):
    """What training calls before it starts (prepare_store) computes no CRC of any
    stored file, yet still finds a truncated entry (by its size) and rebuilds it;
    CRCs are computed only for the files the rebuild writes."""
    import medseg.data.preprocessed as pp_mod
    dl, root = split("brats2023", 6)
    data = fold_data(dl, root, None)
    cfg = resolve_config("cpu", TINY_TRAIN)
    store = prepare_store(cfg, data, tmp_path / "pp", quiet, jobs=1)

    crc_reads: list[str] = []
    real_crc = pp_mod._crc
    monkeypatch.setattr(pp_mod, "_crc", lambda path, *a, **k: crc_reads.append(str(path)) or real_crc(path, *a, **k))
    prepare_store(cfg, data, tmp_path / "pp", quiet, jobs=1)
    assert crc_reads == [], f"training start read {len(crc_reads)} stored files whole, e.g. {crc_reads[:3]}"

    victim = sorted(c["id"] for c in data.train)[3]
    with open(store.path / victim / "label.npy", "r+b") as fh:
        fh.truncate(100)
    said: list[str] = []
    prepare_store(cfg, data, tmp_path / "pp", said.append, jobs=1)
    assert any(victim in s and "label.npy" in s and "bytes" in s and "rebuilding" in s for s in said), said
    assert any("preprocessing 1 of 6" in s for s in said), said
    assert crc_reads and all(victim in p for p in crc_reads), crc_reads
    assert store.label(victim).size > 100


def test_verify_finds_a_flipped_bit_and_names_the_case_and_file(split, tmp_path, capsys):
    """`medseg data verify` on a cv folder: a sound store passes (exit 0); a byte
    flipped in one file (same size: invisible to the cheap check) makes it exit 1
    naming the case and the file; --remove-bad lets the next build repair it."""
    data, cases = _cases(split)
    exp = tmp_path / "cv"
    store = ensure_store(cases, exp / "preprocessed", SPACING, data.channels, data.convention, jobs=1,
                         print_fn=quiet)
    assert main(["data", "verify", "--root", str(exp)]) == 0
    assert "6 entries verified" in capsys.readouterr().out

    victim = cases[4]["id"]
    f = store.path / victim / "image.npy"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    f.write_bytes(bytes(raw))
    rc = main(["data", "verify", "--root", str(store.path)])
    out = capsys.readouterr().out
    assert rc == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and victim in errors[0] and "image.npy" in errors[0] and "CRC-32" in errors[0], out
    assert "--remove-bad" in errors[0]

    assert main(["data", "verify", "--root", str(exp / "preprocessed"), "--remove-bad"]) == 0
    said: list[str] = []
    ensure_store(cases, exp / "preprocessed", SPACING, data.channels, data.convention, jobs=1, print_fn=said.append)
    assert any("preprocessing 1 of 6" in s for s in said), said
    capsys.readouterr()
    assert main(["data", "verify", "--root", str(exp)]) == 0


def test_verify_explains_itself_and_a_folder_without_a_store_is_a_clear_error(tmp_path, capsys):
    import pytest
    with pytest.raises(SystemExit) as exc:
        main(["data", "verify", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "example" in text and "medseg data verify" in text
    assert main(["data", "verify", "--root", str(tmp_path)]) == 2
    assert "no preprocessed dataset" in capsys.readouterr().err
