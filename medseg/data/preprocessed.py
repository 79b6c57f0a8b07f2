"""The preprocessed dataset: every case oriented, resampled, brain-cropped and
z-scored once per experiment, stored compactly on disk and read memory-mapped.

Layout (one folder per preprocessing setting, so that every fold, every
`cv --devices` process and every DDP rank of an experiment reads the same files,
and experiments with the same settings share them)::

    <root>/<key>/settings.json          what <key> hashes: spacing, channel order,
                                        label convention, steps, medseg version
    <root>/<key>/<case>/image.npy       (4, X, Y, Z) float16, CHANNELS order
    <root>/<key>/<case>/label.npy       (X, Y, Z) uint8 label map (the convention's values)
    <root>/<key>/<case>/locations.npy   (M, 4) int16 rows [label, x, y, z]: up to
                                        MAX_LOCATIONS voxels of each tumour label,
                                        for over-sampling tumour patches
    <root>/<key>/<case>/entry.json      shapes, CRC-32 of each file and the source
                                        files' sizes and times: written last

An entry is built in a temporary folder and renamed into place, so it is either
complete or absent. `ensure_store` checks every entry before training (files
present, sizes, CRC-32, source files unchanged) and rebuilds what is corrupt or
stale; a killed run resumes with the cases that are missing.

Why float16 for the images: after the z-score the values lie in about ±20 and
need no fixed-point scale; float16 keeps 11 significant bits (relative error
≤ 2⁻¹¹ ≈ 0.05 %), the same bytes as int16 and half of float32. Regions (TC, WT,
ET) are made from the uint8 label map after a patch is read, not stored.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from medseg.errors import DataError, MedsegError

__all__ = ["STORE_VERSION", "MAX_LOCATIONS", "IMAGE_DTYPE", "store_settings", "store_key", "Store",
           "ensure_store", "check_entry", "build_entry", "tumour_labels"]

#: Bumped when the on-disk form changes: older stores are rebuilt under a new key.
STORE_VERSION = 1
#: Voxels kept per tumour label for over-sampling (nnU-Net keeps 10,000 per class).
MAX_LOCATIONS = 10_000
IMAGE_DTYPE = np.float16
_FILES = ("image.npy", "label.npy", "locations.npy")
_ENTRY = "entry.json"


def store_settings(spacing: Sequence[float], channels: Sequence[str], convention: str) -> dict:
    """What a store's content depends on; its hash names the store folder."""
    from medseg import __version__
    from medseg.transforms import preprocessing
    steps = [type(t).__name__ for t in preprocessing(channels, convention, spacing).transforms]
    return {"store_version": STORE_VERSION, "spacing": [float(s) for s in spacing],
            "channels": list(channels), "convention": convention, "steps": steps,
            "image_dtype": np.dtype(IMAGE_DTYPE).name, "medseg": __version__}


def store_key(settings: dict) -> str:
    from medseg.config import config_hash
    return "pp_" + config_hash(settings)


def tumour_labels(convention: str) -> list[int]:
    """Label values that belong to a region (TC, WT or ET): the values patches are
    over-sampled on (brats2024's resection cavity is not one)."""
    from medseg.labels import get_convention
    return sorted({v for vals in get_convention(convention).region_labels().values() for v in vals})


def _crc(path: Path, chunk: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                return crc
            crc = zlib.crc32(buf, crc)


def _sources(case: dict) -> list[dict]:
    img = case["image"]
    files = (list(img) if isinstance(img, list) else [img]) + ([case["label"]] if case.get("label") else [])
    out = []
    for f in files:
        st = os.stat(f)
        out.append({"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def check_entry(folder: Path, case: dict | None = None, deep: bool = True) -> str | None:
    """Why the entry in `folder` cannot be used (missing, truncated, corrupt, or
    its source files changed since), or None when it is sound. `deep` compares
    every file's CRC-32 with the one recorded when it was written."""
    try:
        entry = json.loads((folder / _ENTRY).read_text())
    except (OSError, ValueError):
        return "missing" if not folder.exists() else f"{_ENTRY} unreadable"
    for name in _FILES:
        rec = entry.get("files", {}).get(name)
        path = folder / name
        if rec is None or not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != rec["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, expected {rec['bytes']}"
        if deep and _crc(path) != rec["crc32"]:
            return f"{name} is corrupt (CRC-32 differs from the one written)"
    if case is not None:
        try:
            now = _sources(case)
        except OSError as exc:
            return f"source file unreadable ({exc})"
        if [(s["path"], s["size"], s["mtime_ns"]) for s in now] != \
                [(s["path"], s["size"], s["mtime_ns"]) for s in entry.get("sources", [])]:
            return "stale: its source files changed since it was written"
    return None


def build_entry(case: dict, store_dir: Path, settings: dict) -> dict:
    """Preprocess one case ({"id", "image", "label"}) with the MONAI transforms and
    write its entry atomically. Returns {"case", "seconds", "bytes"}."""
    from medseg.transforms import IMAGE, LABEL, LabelsToRegionsd, preprocessing
    t0 = time.perf_counter()
    steps = [t for t in preprocessing(settings["channels"], settings["convention"], settings["spacing"],
                                      with_label="label" in case).transforms
             if not isinstance(t, LabelsToRegionsd)]
    from monai.transforms import Compose
    data = {IMAGE: case["image"]}
    if "label" in case:
        data[LABEL] = case["label"]
    try:
        out = Compose(steps)(data)
    except Exception as exc:  # noqa: BLE001 - MONAI wraps every failure in RuntimeError
        raise DataError(f"case {case['id']}: preprocessing failed ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[-1] if str(exc) else ''}); run `medseg data check` "
                        "on the data folder to find the faulty file") from None
    image = np.asarray(out[IMAGE].detach().cpu().numpy(), dtype=np.float32)
    if np.abs(image).max(initial=0) > np.finfo(IMAGE_DTYPE).max:
        raise DataError(f"case {case['id']}: z-scored intensities reach {np.abs(image).max():.3g}, "
                        "beyond float16; check the scan for corrupt voxels")
    shape = image.shape[1:]
    if "label" in case:
        label = np.rint(out[LABEL].detach().cpu().numpy()[0]).astype(np.uint8)
    else:
        label = np.zeros(shape, np.uint8)
    rng = np.random.default_rng(zlib.crc32(case["id"].encode()))
    rows = []
    for v in tumour_labels(settings["convention"]):
        idx = np.argwhere(label == v)
        if len(idx) > MAX_LOCATIONS:
            idx = idx[np.sort(rng.choice(len(idx), MAX_LOCATIONS, replace=False))]
        if len(idx):
            rows.append(np.concatenate([np.full((len(idx), 1), v), idx], axis=1))
    locations = np.concatenate(rows).astype(np.int16) if rows else np.zeros((0, 4), np.int16)

    final = store_dir / case["id"]
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(case["id"]), dir=store_dir))
    try:
        files = {}
        for name, arr in (("image.npy", image.astype(IMAGE_DTYPE)), ("label.npy", label),
                          ("locations.npy", locations)):
            np.save(tmp / name, arr)
            files[name] = {"bytes": (tmp / name).stat().st_size, "crc32": _crc(tmp / name),
                           "shape": list(arr.shape), "dtype": arr.dtype.name}
        entry = {"case": case["id"], "shape": list(shape), "files": files, "sources": _sources(case),
                 "labels_present": sorted(int(v) for v in np.unique(label)),
                 "seconds": time.perf_counter() - t0}
        (tmp / _ENTRY).write_text(json.dumps(entry, indent=1))
        os.chmod(tmp, 0o755)
        if final.exists():
            # Stale or corrupt (the caller checked it), or written meanwhile by
            # another process of the same experiment: replace it, never half.
            old = Path(str(tmp) + ".old")
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if check_entry(final, deep=False) is None:   # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(store_dir, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"case": case["id"], "seconds": time.perf_counter() - t0,
            "bytes": sum(f["bytes"] for f in files.values())}


def _tmp_prefix(case_id: str) -> str:
    """Temporary entry folders name their host and process, so a later run can tell
    the leftovers of a killed process from an entry another process is writing."""
    return f".tmp.{_host()}.{os.getpid()}.{case_id}."


def _host() -> str:
    return socket.gethostname().replace(".", "_") or "host"


def _remove_leftovers(store_dir: Path) -> None:
    """Delete temporary folders of processes of this host that no longer run."""
    host = _host()
    for p in store_dir.glob(".tmp.*"):
        parts = p.name.split(".")
        if len(parts) < 4 or parts[2] != host or not parts[3].isdigit():
            continue
        try:
            os.kill(int(parts[3]), 0)
            continue                      # still running (maybe another rank): leave it
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            continue


def _disk_error(store_dir: Path, exc: OSError) -> MedsegError:
    import errno
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
           errno.EACCES: "it is not writable", errno.EROFS: "it is on a read-only file system",
           errno.EPERM: "it is not writable"}.get(exc.errno, str(exc))
    return MedsegError(f"preprocessed dataset {store_dir}: cannot write ({why}); free space there, or "
                       "pass another folder with --cache-dir (`medseg data preprocess --out`)")


class Store:
    """A built store, read-only: memory-mapped arrays of each case."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.settings = json.loads((self.path / "settings.json").read_text())
        except (OSError, ValueError):
            raise MedsegError(f"{self.path}: not a medseg preprocessed dataset (no readable "
                              "settings.json); build one with `medseg data preprocess`") from None
        self.convention = self.settings["convention"]

    def _load(self, case_id: str, name: str, mmap: bool = True) -> np.ndarray:
        path = self.path / case_id / name
        try:
            return np.load(path, mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable preprocessed entry ({exc}); run `medseg data "
                            f"preprocess` (or the same train/cv command) again to rebuild it") from None

    def image(self, case_id: str, mmap: bool = True) -> np.ndarray:
        """(4, X, Y, Z) float16, memory-mapped unless `mmap` is False."""
        return self._load(case_id, "image.npy", mmap)

    def label(self, case_id: str, mmap: bool = True) -> np.ndarray:
        """(X, Y, Z) uint8 label map in the store's convention."""
        return self._load(case_id, "label.npy", mmap)

    def locations(self, case_id: str) -> np.ndarray:
        """(M, 4) int16 rows [label, x, y, z] of sampled tumour voxels."""
        return self._load(case_id, "locations.npy", mmap=False)

    def entry(self, case_id: str) -> dict:
        return json.loads((self.path / case_id / _ENTRY).read_text())


def _build_one(args):
    case, store_dir, settings = args
    try:
        return build_entry(case, Path(store_dir), settings), None
    except MedsegError as exc:
        return None, str(exc)


def _check_one(args):
    case, store_dir, deep = args
    return case["id"], check_entry(Path(store_dir) / case["id"], case, deep)


def _workers(jobs: int | None) -> int:
    return max(1, jobs if jobs else min(8, os.cpu_count() or 1))


def ensure_store(cases: Sequence[dict], root: str | Path, spacing: Sequence[float], channels: Sequence[str],
                 convention: str, jobs: int | None = None, print_fn: Callable[[str], None] = print,
                 deep: bool = True, wait_for_others: bool = False, share: tuple[int, int] = (0, 1),
                 timeout_s: float | None = None) -> Store:
    """The store of these settings under `root`, with every case of `cases` sound:
    missing, corrupt or stale entries are (re)built in parallel (`jobs` processes,
    default: the CPU count up to 8), each atomically.

    `share=(rank, world)`: this process builds only every world-th case from its
    rank (DDP ranks split the work); with `wait_for_others`, it then waits until
    the other ranks' cases are present too (an error after `timeout_s`)."""
    settings = store_settings(spacing, channels, convention)
    store_dir = Path(root) / store_key(settings)
    try:
        store_dir.mkdir(parents=True, exist_ok=True)
        if not (store_dir / "settings.json").is_file():
            from medseg.data.io import write_json
            write_json(settings, store_dir / "settings.json")
    except OSError as exc:
        raise _disk_error(store_dir, exc) from None
    rank, world = share
    _remove_leftovers(store_dir)
    mine = [c for i, c in enumerate(cases) if i % world == rank]
    t0 = time.perf_counter()
    n = _workers(jobs)
    with _pool(n) if n > 1 and len(mine) > 1 else _Serial() as pool:
        checks = list(pool.map(_check_one, [(c, str(store_dir), deep) for c in mine]))
        todo = [c for c, (_, why) in zip(mine, checks) if why is not None]
        rebuilt = [(cid, why) for cid, why in checks if why not in (None, "missing")]
        for cid, why in rebuilt[:5]:
            print_fn(f"preprocessed entry {store_dir / cid}: {why}; rebuilding it")
        if todo:
            _check_space(store_dir, todo, spacing)
            print_fn(f"preprocessing {len(todo)} of {len(mine)} case(s) into {store_dir} "
                     f"({n} process{'es' if n > 1 else ''})")
            done, total_bytes = 0, 0
            bar = _bar(len(todo))
            futures = [pool.submit(_build_one, (c, str(store_dir), settings)) for c in todo]
            for fut in as_completed(futures):
                res, err = fut.result()
                if err:
                    for f in futures:
                        f.cancel()
                    raise MedsegError(err)
                done += 1
                total_bytes += res["bytes"]
                if bar is not None:
                    bar.update(1)
                elif done == len(todo) or done % max(1, len(todo) // 10) == 0:
                    print_fn(f"  {done}/{len(todo)} cases preprocessed, "
                             f"{time.perf_counter() - t0:.0f} s")
            if bar is not None:
                bar.close()
            print_fn(f"preprocessed {len(todo)} case(s) in {time.perf_counter() - t0:.1f} s, "
                     f"{total_bytes / len(todo) / 1e6:.1f} MB per case")
    if wait_for_others and world > 1:
        _wait_complete(store_dir, cases, print_fn, timeout_s=timeout_s)
    return Store(store_dir)


def _one_thread() -> None:
    """Pool worker start: one torch thread each (n processes on n cores)."""
    import torch
    torch.set_num_threads(1)


def _pool(n: int) -> ProcessPoolExecutor:
    """Worker processes: forked (fast) unless this process holds a CUDA context,
    which must not be forked. The calling process's thread count is left alone
    (training in it must not change with whether the dataset was built)."""
    import multiprocessing as mp
    import torch
    ctx = mp.get_context("spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else "fork")
    return ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_one_thread)


class _Serial:
    """A stand-in for ProcessPoolExecutor that runs in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items):
        return [fn(i) for i in items]

    def submit(self, fn, arg):
        from concurrent.futures import Future
        f = Future()
        try:
            f.set_result(fn(arg))
        except BaseException as exc:  # noqa: BLE001
            f.set_exception(exc)
        return f


def _bar(total: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="preprocessing", unit="case", dynamic_ncols=True)


def _check_space(store_dir: Path, todo: Sequence[dict], spacing: Sequence[float]) -> None:
    """A clear error before starting when the disk evidently cannot hold the entries.
    The estimate reads each case's header: its field of view at the target spacing
    × (4 float16 channels + a uint8 label), before the brain crop (which keeps
    roughly a third to a half of it): an upper bound; half of it must be free."""
    import nibabel as nib
    need = 0
    try:
        free = shutil.disk_usage(store_dir).free
        for c in todo:
            first = c["image"][0] if isinstance(c["image"], list) else c["image"]
            h = nib.load(first).header
            fov = np.array(h.get_data_shape()[:3]) * np.array(h.get_zooms()[:3])
            need += int(np.prod(np.ceil(fov / np.asarray(spacing, float)))) * 9
    except (OSError, ValueError, nib.filebasedimages.ImageFileError):
        return                   # unreadable files are reported, by name, when built
    if free < need // 2:
        raise MedsegError(f"preprocessed dataset {store_dir}: up to {need / 1e9:.1f} GB needed for "
                          f"{len(todo)} case(s), {free / 1e9:.1f} GB free; free space there or pass "
                          "another folder with --cache-dir")


def _wait_complete(store_dir: Path, cases: Sequence[dict], print_fn, poll_s: float = 2.0,
                   timeout_s: float | None = None) -> None:
    """Wait until every case's entry is present (built by other ranks)."""
    t0, told = time.perf_counter(), False
    while True:
        missing = [c["id"] for c in cases if not (store_dir / c["id"] / _ENTRY).is_file()]
        if not missing:
            return
        if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
            raise MedsegError(f"preprocessed dataset {store_dir}: {len(missing)} case(s) (e.g. "
                              f"{missing[0]}) still missing after {timeout_s / 60:.0f} min; another "
                              "rank failed or is slow: see its log, or build the dataset first with "
                              "`medseg data preprocess` (train.ddp_timeout_min sets this wait)")
        if not told and time.perf_counter() - t0 > 30:
            print_fn(f"waiting for other ranks to preprocess {len(missing)} case(s) into {store_dir}")
            told = True
        time.sleep(poll_s)
