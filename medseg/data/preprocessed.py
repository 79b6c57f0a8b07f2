"""The preprocessed dataset: every case oriented, resampled, brain-cropped and
z-scored once per experiment, stored compactly on disk and read memory-mapped.

Layout (one folder per preprocessing setting, so that every fold, every
`cv --devices` process and every DDP rank of an experiment reads the same files,
and experiments with the same settings share them)::

    <root>/<key>/settings.json          what <key> hashes: spacing, channel order,
                                        label convention, steps, medseg version
    <root>/<key>/<case>                 a symbolic link to the case's current
                                        version, .entries/<case>.<host>.<pid>.<rand>
    <root>/<key>/<case>/image.npy       (4, X, Y, Z) float16, CHANNELS order
    <root>/<key>/<case>/label.npy       (X, Y, Z) uint8 label map (the convention's values)
    <root>/<key>/<case>/locations.npy   (M, 4) int16 rows [label, x, y, z]: up to
                                        MAX_LOCATIONS voxels of each tumour label,
                                        for over-sampling tumour patches
    <root>/<key>/<case>/entry.json      shapes, dtypes, sizes and CRC-32 of each file,
                                        the source files' sizes and times: written last
    <root>/<key>/.locks/<case>.lock     flock()ed by the process (re)building <case>

Concurrency. Several processes (folds trained in parallel, Slurm array jobs,
DDP ranks) may find the same entry missing or stale at once. Two mechanisms make
that safe, and the second alone keeps readers correct:

* A per-entry lock (`fcntl.flock` on ``.locks/<case>.lock``), held by a builder
  from its decision to build until the new version is in place. A second builder
  waits, then finds the entry rebuilt and keeps it: no work is done twice and no
  process fails. (flock is advisory and, on NFS, works across machines only where
  the client maps it to NFS locks: Linux ≥ 2.6.12 on NFSv3 with lockd, or NFSv4;
  not with ``nolock``/``local_lock=all``; Lustre needs the ``flock`` mount option.
  Where flock fails, building goes on unlocked: see the next point.)
* One atomic switch. A version is written into its own, unique folder under
  ``.entries/`` and is complete (files, then ``entry.json``) before anything
  points at it; then a new symbolic link is renamed over ``<case>``. rename(2) of
  a link replaces the old link atomically (POSIX, NFS too), so a reader always
  sees the old complete version or the new complete one, never a gap. A folder
  cannot be renamed over a non-empty folder, which is why the entry is a link
  and not the folder itself: the old scheme (entry → .old, then tmp → entry)
  left the case missing between its two renames, and a second builder racing
  through that gap failed. The replaced version is deleted after the switch:
  readers that already opened its files keep them (POSIX unlink semantics; on
  NFS another client holding them open may get ESTALE, which is why rebuilds
  happen before training, not during it).

Checks. Training start does a cheap check of every entry (`check_entry`: entry.json
readable, each file present with its recorded size, dtype and shape, the source
files' sizes and times unchanged): a missing, truncated, stale or half-replaced
entry is rebuilt, for a few metadata reads per case. The full CRC-32 check reads
every byte (≈ 40 GB at BraTS 2021 scale), so it runs once, by the builder right
after writing a version, and on demand with `medseg data verify`
(`verify_store`), not at every training start.

Why float16 for the images: after the z-score the values lie in about ±20 and
need no fixed-point scale; float16 keeps 11 significant bits (relative error
≤ 2⁻¹¹ ≈ 0.05 %), the same bytes as int16 and half of float32. Regions (TC, WT,
ET) are made from the uint8 label map after a patch is read, not stored.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from medseg.data.io import load_array
from medseg.errors import DataError, MedsegError
from medseg.pipeline import PipelineSpec, preprocess, read_case

__all__ = ["STORE_VERSION", "MAX_LOCATIONS", "IMAGE_DTYPE", "store_spec", "store_settings", "store_key", "Store",
           "ensure_store", "check_entry", "build_entry", "tumour_labels", "find_stores", "verify_store",
           "remove_entry"]

#: Bumped when the on-disk form changes: older stores are rebuilt under a new key.
#: 2: entries are links to versions in .entries/ (atomic rebuilds), per-entry locks.
STORE_VERSION = 2
#: Voxels kept per tumour label for over-sampling (nnU-Net keeps 10,000 per class).
MAX_LOCATIONS = 10_000
IMAGE_DTYPE = np.float16
_FILES = ("image.npy", "label.npy", "locations.npy")
_ENTRY = "entry.json"
_VERSIONS = ".entries"
_LOCKS = ".locks"
#: `build_entry(seen=...)` default: the caller saw no particular version; build.
_UNSEEN = object()


def store_spec(spacing: Sequence[float], convention: str) -> PipelineSpec:
    """The pipeline spec whose preprocessing the store holds (window and inference
    values do not change the stored data)."""
    return PipelineSpec(spacing=tuple(spacing), roi=(1, 1, 1), label_convention=convention)


def store_settings(spacing: Sequence[float], channels: Sequence[str], convention: str) -> dict:
    """What a store's content depends on, as values (its hash names the store folder):
    the preprocessing part of the pipeline spec (which carries the implementation's
    version), the files' channel order and label convention, the on-disk form."""
    return {"store_version": STORE_VERSION, "pipeline": store_spec(spacing, convention).preprocessing(),
            "file_channels": list(channels), "convention": convention,
            "image_dtype": np.dtype(IMAGE_DTYPE).name, **_foreground(convention)}


def _foreground(convention: str) -> dict:
    """``{"foreground": values}`` where the over-sampled values include a non-tumour
    class (brats2024 RC, since tasks): stores built before hold no RC locations, so
    their key differs; other conventions' settings (and keys) are unchanged."""
    from medseg.labels import get_convention
    conv = get_convention(convention)
    return {"foreground": tumour_labels(convention)} if conv.outside_regions else {}


def store_key(settings: dict) -> str:
    from medseg.config import config_hash
    return "pp_" + config_hash(settings)


def tumour_labels(convention: str) -> list[int]:
    """Label values patches are over-sampled on: every non-background value (the
    tumour classes, and brats2024's resection cavity, which task gli2024 learns)."""
    from medseg.labels import get_convention
    return sorted(v for v in get_convention(convention).allowed if v != 0)


def _crc(path: Path, chunk: int = 1 << 24) -> int:
    """CRC-32 of a file's bytes (reads all of it: the expensive, deep check)."""
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


# ---------------------------------------------------------------- versions and links

def _version_of(link: Path) -> Path | None:
    """The folder holding the current version of the entry `link`: its link's target,
    the folder itself for an entry written as a plain folder (a store copied with
    links dereferenced), None when there is no entry."""
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return None
    except OSError:                      # EINVAL: not a link
        return link if link.is_dir() else None
    return link.parent / target


def _host() -> str:
    return socket.gethostname().replace(".", "_") or "host"


def _tmp_prefix(case_id: str) -> str:
    """Temporary files name their host and process, so a later run can tell the
    leftovers of a killed process from those of a process still writing."""
    return f".tmp.{_host()}.{os.getpid()}.{case_id}."


def _new_version(store_dir: Path, case_id: str) -> Path:
    """A new, unique, empty version folder for `case_id`: .entries/<case>.<host>.<pid>.<rand>
    (host and pid: `_remove_leftovers` can tell a killed builder's folder)."""
    versions = store_dir / _VERSIONS
    versions.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{case_id}.{_host()}.{os.getpid()}.", dir=versions))
    os.chmod(path, 0o755)                # mkdtemp makes 0700; a shared store is read by others
    return path


def _owner(version: Path) -> tuple[str, str, int] | None:
    """(case, host, pid) from a version folder's name, None for foreign names."""
    parts = version.name.rsplit(".", 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def _switch(store_dir: Path, case_id: str, version: Path) -> None:
    """Point the entry `case_id` at `version` in one atomic step (a new link renamed
    over the old one) and delete the version it replaces."""
    link = store_dir / case_id
    tmp = store_dir / f"{_tmp_prefix(case_id)}{version.name.rsplit('.', 1)[-1]}.link"
    os.symlink(f"{_VERSIONS}/{version.name}", tmp)     # relative: the store can be moved
    old = _version_of(link)
    try:
        os.replace(tmp, link)
    except IsADirectoryError:
        # An entry written as a plain folder (a store copied with `cp -L`): a link
        # cannot replace a folder atomically, so move it aside first. The entry is
        # absent for that moment, once; from then on it is a link.
        old = version.parent / f"{case_id}.{_host()}.{os.getpid()}.plain"
        os.replace(link, old)
        os.replace(tmp, link)
    finally:
        if tmp.is_symlink():
            tmp.unlink()
    if old is not None and old != version:
        _remove(old)


def _remove(path: Path) -> None:
    """Delete a file, link or folder; gone already is fine (another process did it)."""
    if path.is_symlink() or path.is_file():
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    else:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- locks

_LOCK_WARNED = False


@contextmanager
def _entry_lock(store_dir: Path, case_id: str, block: bool = True) -> Iterator[bool]:
    """Hold the lock of entry `case_id` (flock on .locks/<case>.lock): yields True
    when held, False when another process holds it and `block` is False.

    Lock files are never deleted: a process could otherwise lock a file that
    another has just unlinked and re-created, and two would hold "the" lock.
    Where the file system has no working flock (some NFS and Lustre mounts) this
    yields True without a lock, once said on stderr: the atomic switch still keeps
    every reader correct; only a rebuild may then be done twice."""
    import fcntl
    global _LOCK_WARNED
    locks = store_dir / _LOCKS
    locks.mkdir(exist_ok=True)
    fd = os.open(locks / f"{case_id}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        held = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            held = False
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            if not _LOCK_WARNED:
                _LOCK_WARNED = True
                print(f"medseg: no file locks on {locks} ({exc.strerror}); building without them "
                      "(readers stay safe; processes may build the same entry twice)", file=sys.stderr)
        yield held
    finally:
        os.close(fd)                     # closing the last descriptor releases the lock


def _busy(store_dir: Path, case_id: str) -> bool:
    """Whether another process is building `case_id` right now (holds its lock)."""
    if not (store_dir / _LOCKS / f"{case_id}.lock").exists():
        return False
    try:
        with _entry_lock(store_dir, case_id, block=False) as held:
            return not held
    except OSError:
        return False


# ---------------------------------------------------------------- checks

# numpy parses a .npy header with `ast.literal_eval`. On CPython 3.11 before 3.11.8
# two threads in the AST constructor at once can corrupt its global recursion
# counter (python/cpython#106905), after which every `ast` call in the process
# fails with "SystemError: AST constructor recursion depth mismatch". The checks
# run in threads (`_check_all`, `verify_store`): one header parse at a time.
_HEADER_LOCK = threading.Lock()


def _npy_header(path: Path) -> tuple[list[int], str]:
    """(shape, dtype name) from a .npy file's header: a few hundred bytes read."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        with _HEADER_LOCK:
            shape, _, dtype = read(f)
    return list(shape), np.dtype(dtype).name


def _source_problem(entry: dict, case: dict | None) -> str | None:
    """Why the entry's recorded source files differ from `case`'s files now (the
    recorded paths themselves when `case` is None), or None."""
    recorded = entry.get("sources", [])
    try:
        now = _sources(case) if case is not None else \
            [{"path": s["path"], **{k: getattr(os.stat(s["path"]), "st_" + k) for k in ("size", "mtime_ns")}}
             for s in recorded]
    except OSError as exc:
        return f"stale: source file {exc.filename} is unreadable ({exc.strerror})"
    if len(now) != len(recorded):
        return f"stale: the case has {len(now)} source files, {_ENTRY} records {len(recorded)}"
    for old, new in zip(recorded, now):
        if old["path"] != new["path"]:
            return f"stale: it was written from {old['path']}, the case's file is now {new['path']}"
        if (old["size"], old["mtime_ns"]) != (new["size"], new["mtime_ns"]):
            return (f"stale: source file {new['path']} changed since it was written (now {new['size']} "
                    f"bytes, modified {_when(new['mtime_ns'])}; recorded {old['size']} bytes, modified "
                    f"{_when(old['mtime_ns'])})")
    return None


def _when(mtime_ns: int) -> str:
    """A file time for a message: local, to the millisecond (sub-second changes count)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mtime_ns // 10**9)) + f".{mtime_ns // 10**6 % 1000:03d}"


def _check_version(folder: Path, case: dict | None, deep: bool) -> str | None:
    """`check_entry` on one version folder."""
    try:
        entry = json.loads((folder / _ENTRY).read_text())
    except (OSError, ValueError):
        return "missing" if not folder.exists() else f"{_ENTRY} unreadable"
    for name in _FILES:
        rec = entry.get("files", {}).get(name)
        path = folder / name
        if rec is None:
            return f"{_ENTRY} has no record of {name}"
        try:
            size = path.stat().st_size
            if size != rec["bytes"]:
                return f"{name} has {size} bytes, {_ENTRY} records {rec['bytes']} (truncated or overwritten)"
            if "shape" in rec:
                shape, dtype = _npy_header(path)
                if (shape, dtype) != (list(rec["shape"]), rec["dtype"]):
                    return (f"{name} holds a {dtype} array of shape {tuple(shape)}, {_ENTRY} records "
                            f"{rec['dtype']} {tuple(rec['shape'])}")
            if deep:
                crc = _crc(path)
                if crc != rec["crc32"]:
                    return (f"{name} is corrupt: CRC-32 {crc:08x}, {_ENTRY} records {rec['crc32']:08x} "
                            "(same size: the bytes changed on disk)")
        except FileNotFoundError:
            return f"{name} missing"
        except (OSError, ValueError) as exc:
            return f"{name} unreadable ({exc})"
    return _source_problem(entry, case)


def check_entry(folder: Path, case: dict | None = None, deep: bool = False) -> str | None:
    """Why the entry `folder` (<store>/<case>) cannot be used, or None when it is sound.

    Cheap by default: entry.json readable, every file present with its recorded
    size, dtype and shape, the source files (`case`'s, or the recorded paths when
    `case` is None) with their recorded sizes and times; a handful of metadata
    reads per case, which catches missing, truncated, half-written and stale
    entries. `deep` also compares every file's CRC-32 with the recorded one, which
    reads every byte: `medseg data verify`, not every training start.

    A problem seen in a version that was replaced meanwhile (another process
    rebuilt the entry while this one looked) is not reported: the check is redone
    on the new version."""
    why = "missing"
    for _ in range(3):
        version = _version_of(folder)
        if version is None:
            return "missing"
        why = _check_version(version, case, deep)
        if why is None or _version_of(folder) == version:
            return why
    return why


# ---------------------------------------------------------------- building

def _preprocess(case: dict, settings: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (4, X, Y, Z) float16, label (X, Y, Z) uint8, locations (M, 4) int16) of
    one case, by `medseg.pipeline.preprocess` (the code both prediction engines run)."""
    spec = PipelineSpec.from_dict({**store_spec((1, 1, 1), settings["convention"]).to_dict(),
                                   **settings["pipeline"]})
    files = case["image"] if isinstance(case["image"], (list, tuple)) else [case["image"]]
    vol, ref = read_case(files, settings["file_channels"], spec.missing_fill)
    lab_in = load_array(Path(case["label"]), dtype=np.float32) if "label" in case else None
    image, lab, _ = preprocess(vol, ref.affine, spec, lab_in, source=f"case {case['id']}")
    if np.abs(image).max(initial=0) > np.finfo(IMAGE_DTYPE).max:
        raise DataError(f"case {case['id']}: z-scored intensities reach {np.abs(image).max():.3g}, "
                        "beyond float16; check the scan for corrupt voxels")
    shape = image.shape[1:]
    if lab is not None:
        label = np.rint(lab).astype(np.uint8)
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
    return image.astype(IMAGE_DTYPE), label, locations


def _write_array(path: Path, arr: np.ndarray) -> dict:
    """Write `arr` as .npy, flushed to disk, and verify it: the CRC-32 of the bytes in
    memory must equal that of the file read back (the one full read of the file;
    later checks are cheap until `medseg data verify`). → its entry.json record."""
    buf = io.BytesIO()
    np.save(buf, arr)
    data = buf.getbuffer()
    crc = zlib.crc32(data)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())             # on disk before any link points at it
    if _crc(path) != crc:
        raise DataError(f"{path}: the file read back differs from what was written (CRC-32 "
                        f"{_crc(path):08x}, expected {crc:08x}); the disk or file system is faulty: "
                        "check it, or pass another folder with --cache-dir")
    return {"bytes": len(data), "crc32": crc, "shape": list(arr.shape), "dtype": arr.dtype.name}


def build_entry(case: dict, store_dir: Path, settings: dict, seen=_UNSEEN, block: bool = True) -> dict:
    """Preprocess one case ({"id", "image", "label"}) with the MONAI transforms and
    make it the case's entry atomically, holding the entry's lock.

    `seen`: the version folder the caller found unusable (None: no entry). When,
    once the lock is held, the entry is another, sound version, another process
    rebuilt it meanwhile: it is kept, nothing is built. With `block` False and the
    lock held by another process, returns at once with "busy".
    Returns {"case", "seconds", "bytes", "built"} (or {"case", "busy": True})."""
    t0 = time.perf_counter()
    link = Path(store_dir) / case["id"]
    try:
        with _entry_lock(Path(store_dir), case["id"], block) as held:
            if not held:
                return {"case": case["id"], "busy": True}
            now = _version_of(link)
            if seen is not _UNSEEN and now != seen and check_entry(link, case) is None:
                return {"case": case["id"], "seconds": time.perf_counter() - t0, "bytes": 0, "built": False}
            return _build_locked(case, Path(store_dir), settings, t0)
    except OSError as exc:
        raise _disk_error(Path(store_dir), exc) from None


def _build_locked(case: dict, store_dir: Path, settings: dict, t0: float) -> dict:
    """`build_entry`'s work, its lock held: preprocess, write a new version, switch."""
    try:
        sources = _sources(case)         # before the work: a file read meanwhile is then stale
    except OSError as exc:
        raise DataError(f"case {case['id']}: source file {exc.filename} unreadable ({exc.strerror}); "
                        "run `medseg data check` on the data folder") from None
    image, label, locations = _preprocess(case, settings)
    version = _new_version(store_dir, case["id"])
    try:
        files = {name: _write_array(version / name, arr)
                 for name, arr in (("image.npy", image), ("label.npy", label), ("locations.npy", locations))}
        entry = {"case": case["id"], "shape": list(image.shape[1:]), "files": files, "sources": sources,
                 "labels_present": sorted(int(v) for v in np.unique(label)),
                 "seconds": time.perf_counter() - t0}
        with open(version / _ENTRY, "w") as f:          # last: a version with it is complete
            f.write(json.dumps(entry, indent=1))
            f.flush()
            os.fsync(f.fileno())
        _switch(store_dir, case["id"], version)
    except BaseException:
        _remove(version)
        raise
    return {"case": case["id"], "seconds": time.perf_counter() - t0,
            "bytes": sum(f["bytes"] for f in files.values()), "built": True}


def _remove_leftovers(store_dir: Path) -> None:
    """Delete what killed processes of this host left: temporary links, and version
    folders no entry points at. A folder is only judged once its writer is known
    dead: a dead process cannot switch a link to it afterwards, so nothing current
    is ever deleted (other hosts' leftovers stay: their processes cannot be seen)."""
    host = _host()

    def dead(h: str, pid: str | int) -> bool:
        if h != host or not str(pid).isdigit():
            return False
        try:
            os.kill(int(pid), 0)
            return False                  # still running (maybe another rank): leave it
        except ProcessLookupError:
            return True
        except PermissionError:
            return False

    for p in store_dir.glob(".tmp.*"):
        parts = p.name.split(".")
        if len(parts) >= 4 and dead(parts[2], parts[3]):
            _remove(p)
    for p in (store_dir / _VERSIONS).glob("*") if (store_dir / _VERSIONS).is_dir() else []:
        owner = _owner(p)
        if owner is not None and dead(owner[1], owner[2]) and _version_of(store_dir / owner[0]) != p:
            _remove(p)


def remove_entry(store_dir: Path, case_id: str) -> None:
    """Delete entry `case_id` (its link and version), under its lock: the next
    `ensure_store` (train, cv, `medseg data preprocess`) builds it anew."""
    store_dir = Path(store_dir)
    with _entry_lock(store_dir, case_id):
        link = store_dir / case_id
        version = _version_of(link)
        if link.is_symlink():
            link.unlink()
        if version is not None:
            _remove(version)


def _disk_error(store_dir: Path, exc: OSError) -> MedsegError:
    """A write failure as a clear error; "free space" only when space is what failed."""
    space = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}
    access = {errno.EACCES: "it is not writable", errno.EROFS: "it is on a read-only file system",
              errno.EPERM: "it is not writable"}
    what = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    if exc.errno in space:
        return MedsegError(f"preprocessed dataset {store_dir}: cannot write ({what}{space[exc.errno]}); "
                           "free space there, or pass another folder with --cache-dir "
                           "(`medseg data preprocess --out`)")
    why = access.get(exc.errno, exc.strerror or str(exc))
    return MedsegError(f"preprocessed dataset {store_dir}: cannot write ({what}{why}); make it writable, "
                       "or pass another folder with --cache-dir (`medseg data preprocess --out`)")


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
        # Opened through the entry's link: a rebuild switching it meanwhile gives
        # the old or the new file, both complete; an open file outlives its deletion.
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

    def case_ids(self) -> list[str]:
        """Every case with an entry (complete or not), sorted."""
        return sorted(p.name for p in self.path.iterdir()
                      if not p.name.startswith(".") and p.name != "settings.json"
                      and (p.is_symlink() or p.is_dir()))


# ---------------------------------------------------------------- verify

def find_stores(path: str | Path) -> list[Path]:
    """The preprocessed datasets at `path`: a store itself (it holds settings.json),
    a folder of stores (`medseg data preprocess --out`, train's --cache-dir, cv's
    OUT/preprocessed), or an experiment folder holding preprocessed/ (cv's --out)."""
    path = Path(path)
    if (path / "settings.json").is_file():
        return [path]
    for folder in (path, path / "preprocessed"):
        stores = sorted(p for p in folder.glob("pp_*") if (p / "settings.json").is_file())
        if stores:
            return stores
    raise MedsegError(f"{path}: no preprocessed dataset there (expected settings.json in it, or "
                      "pp_*/settings.json in it or in its preprocessed/ folder); pass a store, the "
                      "folder given to `medseg data preprocess --out` / `--cache-dir`, or a cv --out folder")


def verify_store(store_dir: str | Path, jobs: int | None = None) -> list[tuple[str, str]]:
    """Deep-check every entry of a store: files present, sizes, dtypes, shapes,
    CRC-32 of every byte, source files unchanged. → [(case, problem)] for the
    entries that are not sound ("stale: ..." problems are rebuilt by the next
    train/cv/preprocess on their own; the others need `remove_entry` first when
    the damage keeps sizes, as a flipped bit does). Reads the whole store."""
    store = Store(store_dir)
    ids = store.case_ids()
    with ThreadPoolExecutor(max_workers=_workers(jobs)) as pool:   # zlib.crc32 releases the GIL
        found = pool.map(lambda cid: (cid, check_entry(store.path / cid, None, deep=True)), ids)
        return [(cid, why) for cid, why in found if why is not None]


# ---------------------------------------------------------------- ensure_store

def _build_one(args):
    case, store_dir, settings, seen, block = args
    try:
        return build_entry(case, Path(store_dir), settings, seen, block), None
    except MedsegError as exc:
        return None, str(exc)


def _workers(jobs: int | None) -> int:
    return max(1, jobs if jobs else min(8, os.cpu_count() or 1))


def _check_all(store_dir: Path, cases: Sequence[dict], deep: bool,
               n: int) -> list[tuple[dict, Path | None, str | None]]:
    """[(case, version seen, problem or None)] for every case: threads, since the
    cheap check waits on metadata reads (a network file system) and the deep one
    on zlib, which releases the GIL."""
    def one(case):
        link = store_dir / case["id"]
        seen = _version_of(link)
        return case, seen, check_entry(link, case, deep)
    if n == 1 or len(cases) < 2:
        return [one(c) for c in cases]
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, cases))


def ensure_store(cases: Sequence[dict], root: str | Path, spacing: Sequence[float], channels: Sequence[str],
                 convention: str, jobs: int | None = None, print_fn: Callable[[str], None] = print,
                 deep: bool = False, wait_for_others: bool = False, share: tuple[int, int] = (0, 1),
                 timeout_s: float | None = None) -> Store:
    """The store of these settings under `root`, with every case of `cases` sound:
    missing, truncated or stale entries are (re)built in parallel (`jobs` processes,
    default: the CPU count up to 8), each atomically and under its lock, so other
    processes may build and read the same store at the same time.

    The check is the cheap one (`check_entry`); `deep` adds the CRC-32 of every
    file, which reads the whole store (`medseg data verify` does it on demand).
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
    n = _workers(jobs)
    checks = _check_all(store_dir, mine, deep, n)
    todo = [(c, seen) for c, seen, why in checks if why is not None]
    rebuilt = [(c["id"], why) for c, _, why in checks if why not in (None, "missing")]
    for cid, why in rebuilt[:5]:
        print_fn(f"preprocessed entry {store_dir / cid}: {why}; rebuilding it")
    if len(rebuilt) > 5:
        print_fn(f"... and {len(rebuilt) - 5} more entries to rebuild")
    if todo:
        _check_space(store_dir, [c for c, _ in todo], spacing)
        _build_all(store_dir, todo, settings, n, len(mine), print_fn)
    if wait_for_others and world > 1:
        _wait_complete(store_dir, cases, print_fn, timeout_s=timeout_s)
    return Store(store_dir)


def _build_all(store_dir: Path, todo: Sequence[tuple[dict, Path | None]], settings: dict, n: int,
               of: int, print_fn) -> None:
    """Build the `todo` entries in `n` processes. Each first tries its entry's lock
    without waiting; an entry another process is building is queued again, behind
    the rest, to wait for its lock: meanwhile this process builds other cases
    (two trainers starting at once share the work instead of queueing on it)."""
    t0 = time.perf_counter()
    print_fn(f"preprocessing {len(todo)} of {of} case(s) into {store_dir} "
             f"({n} process{'es' if n > 1 else ''})")
    done, built, total_bytes = 0, 0, 0
    bar = _bar(len(todo))
    with _pool(n) if n > 1 and len(todo) > 1 else _Serial() as pool:
        pending = {pool.submit(_build_one, (c, str(store_dir), settings, seen, False)): (c, seen)
                   for c, seen in todo}
        while pending:
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in finished:
                case, seen = pending.pop(fut)
                res, err = fut.result()
                if err:
                    for f in pending:
                        f.cancel()
                    raise MedsegError(err)
                if res.get("busy"):
                    pending[pool.submit(_build_one, (case, str(store_dir), settings, seen, True))] = (case, seen)
                    continue
                done += 1
                built += res["built"]
                total_bytes += res["bytes"]
                if bar is not None:
                    bar.update(1)
                elif done == len(todo) or done % max(1, len(todo) // 10) == 0:
                    print_fn(f"  {done}/{len(todo)} cases preprocessed, {time.perf_counter() - t0:.0f} s")
    if bar is not None:
        bar.close()
    others = f"; {done - built} built meanwhile by another process" if done > built else ""
    print_fn(f"preprocessed {built} case(s) in {time.perf_counter() - t0:.1f} s, "
             f"{total_bytes / max(1, built) / 1e6:.1f} MB per case{others}")


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
    roughly a third to a half of it): an upper bound; half of it must be free.
    Cases another process is building now are left out: that process is using
    the space for them already (counting them twice made a false "disk full"),
    and this one will find them built."""
    import nibabel as nib
    need, counted = 0, 0
    try:
        free = shutil.disk_usage(store_dir).free
        for c in todo:
            if _busy(store_dir, c["id"]):
                continue
            first = c["image"][0] if isinstance(c["image"], list) else c["image"]
            h = nib.load(first).header
            fov = np.array(h.get_data_shape()[:3]) * np.array(h.get_zooms()[:3])
            need += int(np.prod(np.ceil(fov / np.asarray(spacing, float)))) * 9
            counted += 1
    except (OSError, ValueError, nib.filebasedimages.ImageFileError):
        return                   # unreadable files are reported, by name, when built
    if free < need // 2:
        raise MedsegError(f"preprocessed dataset {store_dir}: up to {need / 1e9:.1f} GB needed for "
                          f"{counted} case(s), {free / 1e9:.1f} GB free; free space there or pass "
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
