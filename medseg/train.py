"""One fold's training: a short, explicit loop.

    setup → data → model/loss/optimiser/schedule → [resume] →
    for epoch: seed(epoch) → train_epoch → [validate] → checkpoint → log

Reproducibility: every random stream is re-seeded from (seed, epoch) at the
start of each epoch (case order, patch sampling and augmentation, torch), so a
run resumed from the checkpoint of epoch e replays epochs e+1… exactly as an
uninterrupted run would. The RNG states are stored in checkpoints as well.

Distributed: under `torchrun`, each rank trains on its shard of the epoch's
case sequence with DistributedDataParallel (gloo on CPU, NCCL on CUDA); rank 0
validates, logs and writes checkpoints.

Outputs in `out_dir`: ``config.json`` (resolved), ``env.json``,
``checkpoints/{last,best,final}.pt``, ``log.csv``, ``tensorboard/`` (when the
tensorboard package is installed), ``learning_curve.png`` (with matplotlib),
``train_summary.json`` (written last: its presence means the fold finished).
"""

from __future__ import annotations

import copy
import csv
import io
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from monai.data import DataLoader
from monai.transforms import Compose
from torch import nn

from medseg import __version__
from medseg.config import experiment
from medseg.data.folds import datalist_task, load_datalist
from medseg.data.io import atomic_path, write_json
from medseg.data.patches import Augmenter, EpochSampler, PatchDataset, VolumeDataset
from medseg.data.preprocessed import Store, ensure_store
from medseg.errors import MedsegError
from medseg.grad_checkpoint import enable_grad_checkpoint
from medseg.infer import autocast, cpu_bf16_native, predict_probs
from medseg.pipeline import PipelineSpec
from medseg.labels import CHANNELS, REGIONS, Task, get_convention, get_task
from medseg.losses import build_loss, check_loss, log_inverse_weights
from medseg.metrics import score_case
from medseg.models import missing_channels, network_from_spec, size_divisor, unet3d_outputs
from medseg.scoring import DEFAULT_RULES, get_rules
from medseg.teacher import SoftTargets, check_distill, check_split, ensure_targets, open_teacher, targets_dir
from medseg.transforms import IMAGE, LABEL, SOFT, patch_augmentation, preprocessing

__all__ = ["FoldData", "fold_data", "train_fold", "lr_factor", "CHECKPOINT_DIR", "build_network",
           "build_criterion", "class_weights", "build_transforms", "build_optimizer", "deep_supervised", "DATA_CACHE",
           "modality_dropout", "modality_dropout_weight", "scale_dropped_gradient", "input_subsets",
           "initial_weights", "augment_on_device", "loader_workers",
           "prepare_store", "store_root", "DEFAULT_STORE", "distilling", "soft_targets"]

CHECKPOINT_DIR = "checkpoints"


# ----------------------------------------------------------------------------- data
@dataclass
class FoldData:
    train: list[dict]        # {"id", "image", "label"} with absolute paths
    val: list[dict]
    channels: list[str]      # the files' channel order
    convention: str          # label convention name
    datalist: Path
    task: str = ""           # BraTS task (`medseg.labels.TASKS`), resolved by `fold_data`


def _abs(entry: dict, root: Path) -> dict:
    img = entry["image"]
    image = [str(root / p) for p in img] if isinstance(img, list) else str(root / img)
    out = {"id": entry["id"], IMAGE: image}
    if "label" in entry:
        out[LABEL] = str(root / entry["label"])
    return out


def fold_data(datalist: str | Path, data_root: str | Path, fold: int | None,
              task: str | None = None) -> FoldData:
    """Training and validation cases of `fold` (validation = the cases with that fold
    number). `fold=None` trains on every case and validates on none. `task`: the
    BraTS task (None: the datalist's, or detected: `datalist_task`)."""
    dl = load_datalist(datalist)
    resolved, _ = datalist_task(dl, task, str(datalist))
    root = Path(data_root)
    if not root.is_dir():
        raise MedsegError(f"data root {root} is not a folder; pass --data-root (bundle: --data_root), "
                          f"the folder the datalist {datalist} paths are relative to")
    k = dl["num_folds"]
    if fold is not None and not 0 <= fold < k:
        raise MedsegError(f"fold {fold} does not exist in {datalist}: it has folds 0..{k - 1}")
    entries = dl["training"]
    first = entries[0]["image"] if entries else None
    probe = root / (first[0] if isinstance(first, list) else first) if first else None
    if probe is not None and not probe.exists():
        raise MedsegError(f"{probe} not found: the datalist {datalist} paths are relative to the "
                          f"data root; pass --data-root (bundle: --data_root) with the folder that holds "
                          f"{entries[0]['id']}")
    train = [_abs(e, root) for e in entries if e["fold"] != fold]
    val = [_abs(e, root) for e in entries if e["fold"] == fold]
    return FoldData(train, val, list(dl["channels"]), dl["label_convention"]["name"], Path(datalist),
                    resolved.name)


def run_task(cfg: dict) -> Task:
    """The experiment's task (``data.task``; None: gli2023's three regions, as before
    tasks existed — training resolves it from the datalist first: `with_task`)."""
    return get_task(cfg["data"].get("task") or "gli2023")


def with_task(cfg: dict, task: str) -> dict:
    """A copy of `cfg` with ``data.task`` set (what every builder then reads)."""
    out = copy.deepcopy(cfg)
    out["data"]["task"] = task
    return out


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- components
# The experiment's values → its components. Training calls these, and the bundle's
# ``network_def``/``loss``/``*_transforms`` entries point at them, so each component
# is built in one place.
def deep_supervised(cfg: dict) -> bool:
    """Whether training uses deep supervision (``train.deep_supervision``, and a unet3d
    deep enough to have a head above its lowest decoder level)."""
    return (cfg["model"]["name"] == "unet3d" and bool(cfg["train"]["deep_supervision"])
            and unet3d_outputs(**cfg["model"]["args"]) > 1)


def build_network(cfg: dict, training: bool = False) -> nn.Module:
    """The experiment's network; with `training`, with its deep-supervision heads."""
    return network_from_spec(network_spec(cfg), deep_supervision=training and deep_supervised(cfg))


def network_spec(cfg: dict) -> dict:
    """``{"name", "args"}`` of the experiment's network, with ``out_channels`` set when
    the task has other than three outputs (gli2024, ped2024: four)."""
    n = len(run_task(cfg).outputs)
    args = dict(cfg["model"]["args"])
    if n != len(REGIONS):
        args["out_channels"] = n
    return {"name": cfg["model"]["name"], "args": args}


def build_criterion(cfg: dict, code_weights: Sequence[float] | None = None) -> nn.Module:
    """The loss of ``train.loss`` (default: region Dice + binary cross-entropy), over
    the deep-supervision outputs when used; `code_weights` (`class_weights`) weigh
    its cross-entropy term per class of voxel."""
    spec = cfg["train"]["loss"]
    if not deep_supervised(cfg):
        return build_loss(spec, deep_supervision=False, code_weights=code_weights)
    return build_loss(spec, deep_supervision=True, levels=unet3d_outputs(**cfg["model"]["args"]),
                      code_weights=code_weights)


def class_weights(cfg: dict, store: Store, case_ids: Sequence[str]) -> dict | None:
    """``train.loss.class_weights=log_inverse``: the training cases' voxel counts per
    class (a class is the set of regions a voxel is in: `region_codes`), counted on
    the preprocessed label maps (model spacing, cropped to the head) →
    {"codes": weight per code (length 2^regions, for the loss), "classes":
    {name: {"regions", "voxels", "weight"}} (recorded in the checkpoint)};
    None when the loss is unweighted."""
    if cfg["train"]["loss"]["class_weights"] == "none":
        return None
    conv = get_convention(store.convention)
    outputs = run_task(cfg).outputs
    members = conv.region_labels(run_task(cfg))
    counts = np.zeros(2 ** len(outputs), np.float64)
    code_of = {}
    for v in sorted(conv.allowed):
        code_of[v] = sum(2 ** i for i, r in enumerate(outputs) if v in members[r])
    for cid in case_ids:
        lab = np.asarray(store.label(cid))
        found = np.bincount(lab.ravel(), minlength=256)
        stray = [int(v) for v in np.flatnonzero(found) if v not in code_of]
        if stray:
            raise MedsegError(f"case {cid}: label values {stray} are not in the {store.convention} "
                              f"convention ({sorted(code_of)}); check the datalist's label_convention")
        for v, code in code_of.items():
            counts[code] += found[v]
    weights = log_inverse_weights(counts)
    classes = {}
    for code in np.flatnonzero(counts):
        regions = [r for i, r in enumerate(outputs) if code >> i & 1]
        name = "+".join(regions) if regions else "background"
        classes[name] = {"regions": regions, "voxels": int(counts[code]), "weight": float(weights[code])}
    return {"rule": "1 / ln(1.02 + count / max count)", "codes": weights.tolist(), "classes": classes}


def modality_dropout(cfg: dict) -> float:
    """``train.modality_dropout``: the probability that a training sample loses a
    random subset of its modalities (0 in configs written before it existed)."""
    p = float(cfg["train"].get("modality_dropout", 0.0))
    if not 0.0 <= p <= 1.0:
        raise MedsegError(f"train.modality_dropout={p}: expected a probability between 0 and 1")
    if cfg["model"]["args"].get("missing_aware") and not p > 0:
        raise MedsegError("model.args.missing_aware=true conditions the network on which modalities are "
                          "missing, which only training with modality dropout shows it: set "
                          "train.modality_dropout > 0 (e.g. 0.3), or drop model.args.missing_aware")
    return p


def modality_dropout_weight(cfg: dict) -> float:
    """``train.modality_dropout_weight``: the share of its gradient that a training
    sample which lost a modality passes on (1: as much as a complete one; 1 in
    configs written before it existed). Below 1 it keeps the complete-input
    behaviour closer to a model trained without dropout."""
    w = float(cfg["train"].get("modality_dropout_weight", 1.0))
    if not 0.0 < w <= 1.0:
        raise MedsegError(f"train.modality_dropout_weight={w}: expected a weight in (0, 1]")
    return w


def scale_dropped_gradient(out: torch.Tensor, x: torch.Tensor, weight: float) -> torch.Tensor:
    """`out` (float32) with the gradient that flows back through sample b scaled by
    `weight` where input `x[b]` lacks a modality (`missing_channels`); the values,
    hence the loss, are unchanged, and so are complete samples' gradients."""
    out = out.float()
    sc = torch.where(missing_channels(x).any(1), weight, 1.0).view(-1, *[1] * (out.ndim - 1))
    return out * sc + out.detach() * (1 - sc)


def input_subsets(p: float) -> str:
    """What a model trained with modality dropout `p` accepts (checkpoint, ONNX and
    bundle metadata)."""
    return ("any non-empty subset of " + ", ".join(CHANNELS)) if p > 0 else \
        ("all four: " + ", ".join(CHANNELS))


def initial_weights(cfg: dict, fold: int | None, datalist: Path) -> tuple[Path, dict] | None:
    """``train.init_from``: the weights training starts from (None: random).

    It names a `medseg cv` folder (fold k starts from that cv's fold k, so that
    no case of this fold's validation set was seen in training), a `medseg train`
    folder, or a checkpoint file. The network must be the same; the split must be
    the same (same datalist file, same fold), else the validation figures would be
    measured on cases the initial model was trained on."""
    src = cfg["train"].get("init_from")
    if not src:
        return None
    path = Path(str(src))
    if path.is_dir() and (path / f"fold_{fold}").is_dir():
        path = path / f"fold_{fold}"
    if path.is_dir():
        cands = [path / CHECKPOINT_DIR / n for n in ("last.pt", "final.pt")]
        found = [c for c in cands if c.is_file()]
        if not found:
            raise MedsegError(f"train.init_from={src}: no checkpoint for fold {fold} (looked for "
                              f"{', '.join(str(c) for c in cands)}); pass a cv folder with fold_{fold}/, "
                              "a training run folder or a .pt checkpoint")
        path = found[0]
    if not path.is_file():
        raise MedsegError(f"train.init_from={src}: no such checkpoint or run folder")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        meta, weights = ck["meta"], ck["model"]
    except Exception as e:   # any unreadable file gets the same explanation
        raise MedsegError(f"train.init_from: {path} is not a medseg checkpoint ({type(e).__name__}: {e})") from e
    want = {"name": cfg["model"]["name"], "args": dict(cfg["model"]["args"])}
    have = meta.get("network")
    if isinstance(have, dict) and want["args"].get("missing_aware") and not have.get("args", {}).get("missing_aware"):
        # a plain network starts a missing-aware one: same weights, modulation from zero
        have = {**have, "args": {**have.get("args", {}), "missing_aware": True}}
    if have != want:
        raise MedsegError(f"train.init_from: {path} holds network {meta.get('network')}, this run builds "
                          f"{want}; start from a model of the same network (same preset)")
    same_split = meta.get("fold") == fold and Path(str(meta.get("datalist"))).resolve() == Path(datalist).resolve()
    if not same_split:
        raise MedsegError(f"train.init_from: {path} was trained on fold {meta.get('fold')} of "
                          f"{meta.get('datalist')}, this run is fold {fold} of {datalist}; the initial "
                          "model may have seen this fold's validation cases. Start from the same fold of "
                          "the same datalist")
    return path, weights


def pipeline_spec(cfg: dict, convention: str) -> PipelineSpec:
    """The experiment's `PipelineSpec`: preprocessing at ``data.spacing``, windows of
    ``train.patch``, the ``infer`` values; written into every checkpoint."""
    inf = cfg["infer"]
    return PipelineSpec(spacing=tuple(cfg["data"]["spacing"]), roi=tuple(cfg["train"]["patch"]),
                        label_convention=convention, task=run_task(cfg).name, overlap=float(inf["overlap"]),
                        sw_batch_size=int(inf["sw_batch_size"]), blend=inf.get("blend", "gaussian"),
                        threshold=float(inf["threshold"]))


def build_transforms(cfg: dict, channels, convention: str, training: bool = True) -> Compose:
    """What training runs, as MONAI transforms. `training=False`: the preprocessing of
    a case (images in `channels` order, labels in `convention`) by the experiment's
    pipeline spec, as the preprocessed dataset stores it and validation reads it.
    `training=True`: the augmentation of a patch cut from that dataset
    (`medseg.data.patches.PatchDataset` picks it, tumour over-sampled
    ``train.pos_neg``), ``image`` `(4, *patch)` and ``label`` `(1, *patch)` label map."""
    if training:
        return patch_augmentation(modality_dropout(cfg), soft=distilling(cfg))
    return preprocessing(channels, convention, pipeline_spec(cfg, convention))


def build_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (nnU-Net) or AdamW, from ``train`` values."""
    tcfg = cfg["train"]
    name = tcfg["optimizer"]
    if name == "sgd":
        return torch.optim.SGD(params, lr=tcfg["lr"], momentum=tcfg["momentum"], nesterov=True,
                               weight_decay=tcfg["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    raise MedsegError(f"unknown optimizer {name!r}; expected 'sgd' or 'adamw'")


# ----------------------------------------------------------------------------- schedule
def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """LR multiplier at iteration `step`: linear warm-up over `warmup` steps, then
    cosine to 0 or poly (1 - t)^0.9 (nnU-Net)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "poly":
        return (1.0 - t) ** 0.9
    raise MedsegError(f"unknown schedule {schedule!r}; expected 'cosine' or 'poly'")


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def ddp_timeout_s(cfg: dict) -> float:
    """``train.ddp_timeout_min`` in seconds: how long a rank waits for the others
    (process group collectives, the shared preprocessed dataset)."""
    minutes = float(cfg["train"].get("ddp_timeout_min", 30))
    if minutes <= 0:
        raise MedsegError(f"train.ddp_timeout_min={minutes}: expected minutes > 0")
    return 60.0 * minutes


def _setup_distributed(device: torch.device, cfg: dict) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        import datetime
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=ddp_timeout_s(cfg)))
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cpu":
        # 2 ranks on 2 cores: one thread each, not two threads fighting per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.world))
    return d


# ----------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": {"keys": torch.as_tensor(keys.astype(np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _save(obj: dict, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _environment() -> dict:
    import monai
    return {"medseg": __version__, "torch": torch.__version__, "monai": monai.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cuda": torch.version.cuda,
            "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- logging
#: data_wait: the fraction of the epoch's training loop spent waiting for batches
#: (the loader too slow for the device); gpu_mem_gb: peak GPU memory allocated.
def _csv_fields(regions=REGIONS) -> list[str]:
    return (["epoch", "train_loss", "lr", "seconds", "data_wait", "gpu_mem_gb"]
            + [f"dice_{r}" for r in regions] + [f"hd95_{r}" for r in regions] + ["dice_mean"])


def _write_logs(history: list[dict], out_dir: Path, plot: bool = True, regions=REGIONS) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_csv_fields(regions), extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(out_dir / "log.csv") as tmp:
        tmp.write_text(buf.getvalue())
    if not plot:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot([h["epoch"] for h in history], [h["train_loss"] for h in history])
    ax[0].set(xlabel="epoch", ylabel="training loss", title="loss")
    val = [h for h in history if "dice_mean" in h]
    for r in regions:
        ax[1].plot([h["epoch"] for h in val], [h[f"dice_{r}"] for h in val], marker="o", label=r)
    ax[1].set(xlabel="epoch", ylabel="Dice", title="validation Dice", ylim=(0, 1))
    ax[1].legend()
    fig.tight_layout()
    with atomic_path(out_dir / "learning_curve.png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


class _TensorBoard:
    """TensorBoard scalars when the `tensorboard` package is installed; else nothing."""

    def __init__(self, log_dir: Path, start_epoch: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.w = SummaryWriter(str(log_dir), purge_step=start_epoch + 1)
        except ImportError:
            self.w = None

    def log(self, row: dict) -> None:
        if self.w is None:
            return
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)):
                self.w.add_scalar(k, v, row["epoch"])
        self.w.flush()

    def close(self) -> None:
        if self.w is not None:
            self.w.close()


def _progress(total: int, desc: str, enabled: bool):
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------- steps
#: Folder of preprocessed datasets, beside the run folders (`medseg train --out
#: runs/x` → runs/preprocessed/<key>; `medseg cv --out runs/cv` → runs/cv/preprocessed/<key>).
DEFAULT_STORE = "preprocessed"


def store_root(out_dir: Path, cache_dir: str | Path | None) -> Path:
    """Where the preprocessed datasets live: `cache_dir`, or DEFAULT_STORE beside `out_dir`."""
    return Path(cache_dir) if cache_dir else Path(out_dir).resolve().parent / DEFAULT_STORE


def loader_workers(cfg: dict, world: int = 1) -> int:
    """``data.num_workers``, or with null the CPU count (shared by the ranks of this
    machine) minus one for the training process, at most 8."""
    n = cfg["data"]["num_workers"]
    if n is None or n == "auto":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return max(0, min(8, (os.cpu_count() or 1) // max(1, local) - 1))
    if not isinstance(n, int) or n < 0:
        raise MedsegError(f"data.num_workers={n!r}: expected a count >= 0, or null for one per CPU core")
    return n


def prepare_store(cfg: dict, data: FoldData, root: Path, print_fn=print, share=(0, 1),
                  timeout_s: float | None = None, jobs: int | None = None) -> Store:
    """The experiment's preprocessed dataset (every case of the datalist: built once,
    shared by every fold and rank), built or repaired as needed."""
    cases = sorted(data.train + data.val, key=lambda c: c["id"])
    return ensure_store(cases, root, cfg["data"]["spacing"], data.channels, data.convention, jobs=jobs,
                        print_fn=print_fn, share=share, wait_for_others=share[1] > 1, timeout_s=timeout_s)


AUGMENT_WHERE = ("auto", "worker", "device")


def augment_on_device(cfg: dict, device: torch.device) -> bool:
    """``data.augment``: where training patches are augmented. ``worker``: in the
    loader workers (CPU); ``device``: batched on the training device, the workers
    only read patches (the preprocessed dataset only); ``auto`` (default): on the
    device when it is a GPU and the dataset is the preprocessed one."""
    where = cfg["data"].get("augment", "auto")
    if where not in AUGMENT_WHERE:
        raise MedsegError(f"data.augment={where!r}: expected one of {', '.join(AUGMENT_WHERE)}")
    return where == "device" or (where == "auto" and device.type == "cuda")


#: The one training data path (``data.cache``): the preprocessed dataset, read by patches.
DATA_CACHE = "preprocessed"


def check_data_cache(cfg: dict) -> None:
    """``data.cache`` must be the preprocessed dataset: the in-memory and disk caches
    (MONAI CacheDataset/PersistentDataset with their own augmentation) were retired,
    so that training has one data path."""
    cache = cfg["data"].get("cache", DATA_CACHE)
    if cache != DATA_CACHE:
        raise MedsegError(f"data.cache={cache!r}: the in-memory and disk caches were retired; training "
                          f"reads the preprocessed dataset ({DATA_CACHE!r}: same preprocessing, built once "
                          f"per experiment, memory-mapped). Remove the override or set data.cache={DATA_CACHE}")


def _datasets(data: FoldData, cfg: dict, store_dir: Path, print_fn=print, share=(0, 1),
              timeout_s: float | None = None, on_device: bool = False, fold: int | None = None,
              device: torch.device | None = None):
    """(patch dataset of the training cases, volume dataset of the validation cases),
    both read from the experiment's preprocessed dataset; with ``train.distill`` the
    patches carry the teacher's outputs (`soft_targets`)."""
    store = prepare_store(cfg, data, store_dir, print_fn, share, timeout_s)
    aug = build_transforms(cfg, data.channels, data.convention, training=True)
    train_ids = [c["id"] for c in data.train]
    soft, teacher = soft_targets(cfg, data, store, store_dir, fold, device, print_fn, share)
    task = run_task(cfg).name
    train_ds = PatchDataset(store, train_ids, cfg["train"]["patch"],
                            *cfg["train"]["pos_neg"], aug, augment=not on_device, soft=soft, task=task)
    train_ds.teacher = teacher
    return train_ds, VolumeDataset(store, [c["id"] for c in data.val], task)


def distilling(cfg: dict) -> bool:
    """Whether the run learns from a teacher (``train.distill.teacher`` set)."""
    return check_distill(cfg["train"]["distill"])["teacher"] is not None


def soft_targets(cfg: dict, data: FoldData, store: Store, store_dir: Path, fold: int | None,
                 device: torch.device | None = None, print_fn=print, share=(0, 1)):
    """(`SoftTargets` of fold `fold`'s training cases, the teacher's record for the
    checkpoint), or (None, None) without ``train.distill.teacher``. Teacher fold k
    for fold k, after checking both hold out the same cases; the outputs are
    computed once (by rank 0 under torchrun) and stored beside the store."""
    spec = check_distill(cfg["train"]["distill"])
    if spec["teacher"] is None:
        return None, None
    teacher = open_teacher(spec["teacher"])
    train_ids = [c["id"] for c in data.train]
    check_split(teacher, fold, train_ids, [c["id"] for c in data.val])
    root = Path(store_dir)
    if share[0] == 0:
        folder = ensure_targets(root, teacher, fold, store, train_ids, spec["teacher_tta"],
                                str(device) if device is not None else None, print_fn)
    if share[1] > 1:
        dist.barrier()
    folder = targets_dir(root, teacher, fold, store, spec["teacher_tta"])
    record = {"weight": float(spec["weight"]), "teacher_tta": spec["teacher_tta"], "outputs": str(folder),
              **teacher.describe(fold)}
    return SoftTargets(folder, train_ids, spec["weight"]), record


def _check_patch(cfg: dict) -> None:
    div = size_divisor(cfg["model"]["name"], **cfg["model"]["args"])
    patch = cfg["train"]["patch"]
    if len(patch) != 3 or any(int(p) % div for p in patch):
        raise MedsegError(f"train.patch {patch}: each size must be a multiple of {div} for "
                          f"{cfg['model']['name']} {cfg['model']['args']} (2^downsamplings); "
                          f"e.g. train.patch=[{div * 4},{div * 4},{div * 4}]")


def _train_epoch(model, loader, loss_fn, opt, sched, cfg, device, deep_sup, bar,
                 scaler: torch.amp.GradScaler | None = None, augmenter: Augmenter | None = None
                 ) -> tuple[float, float]:
    """One epoch; returns the mean loss and the fraction of the time spent waiting
    for batches. With `augmenter`, batches are raw patches augmented here, on the
    device. The loss stays on the device: the host
    waits for it once, at the end (a progress bar on a terminal reads it per step)."""
    model.train()
    tcfg = cfg["train"]
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    total, n = torch.zeros((), device=device), 0
    cuda = device.type == "cuda"
    drop_w = modality_dropout_weight(cfg) if modality_dropout(cfg) > 0 else 1.0
    wait, t_start = 0.0, time.perf_counter()
    t_ask = t_start
    for batch in loader:
        wait += time.perf_counter() - t_ask          # the step waited this long for its batch
        x = torch.as_tensor(batch[IMAGE]).to(device, non_blocking=cuda)
        y = torch.as_tensor(batch[LABEL]).to(device, non_blocking=cuda)
        if augmenter is not None:
            soft = batch.get(SOFT)
            x, y = augmenter.batch(x, y, batch["seed"],
                                   None if soft is None else torch.as_tensor(soft).to(device, non_blocking=cuda))
        if tcfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with autocast(device, tcfg["amp"], tcfg["amp_dtype"]):
            out = model(x)
        if drop_w != 1.0:
            out = scale_dropped_gradient(out, x, drop_w)
        # DynUNet in training mode: (B, 1 + heads, 3, ...) → list, full resolution first.
        preds = [o.float() for o in torch.unbind(out, 1)] if deep_sup else out.float()
        loss = loss_fn(preds, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tcfg["grad_clip"]:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
        scaler.step(opt)
        scaler.update()
        sched.step()
        total += loss.detach()
        n += 1
        if bar is not None:
            bar.set_postfix(loss=f"{total.item() / n:.3f}")
            bar.update(1)
        t_ask = time.perf_counter()
    mean = total.item() / max(1, n)
    if not math.isfinite(mean):
        raise MedsegError(f"training loss became {mean} (lr {sched.get_last_lr()[0]:.3g}); lower "
                          "train.lr or set train.amp=false, then resume from the last good checkpoint "
                          "or start again")
    return mean, wait / max(1e-9, time.perf_counter() - t_start)


def validate(model: nn.Module, val_ds, cfg: dict, device: torch.device, dd: "Dist | None" = None
             ) -> dict[str, float]:
    """Full-volume sliding-window inference (the prediction code) on preprocessed
    validation cases; mean Dice and HD95 per region at the training spacing. Under
    DDP each rank validates every world-th case and the rows are gathered."""
    inf, n_max = cfg["infer"], cfg["train"]["val_max_cases"]
    task = run_task(cfg)
    spec = pipeline_spec(cfg, task.convention)  # windows and blending; the data is preprocessed already
    rules = get_rules(DEFAULT_RULES)
    dd = dd or Dist()
    rows = []
    n = len(val_ds) if not n_max else min(n_max, len(val_ds))
    for i in range(dd.rank, n, dd.world):
        item = val_ds[i]
        probs = predict_probs([model], item[IMAGE], spec, cfg["train"]["amp"], device=device,
                              amp_dtype=cfg["train"]["amp_dtype"])
        ref = np.asarray(item[LABEL]) > 0.5
        rows.append(score_case(probs.numpy() > inf["threshold"], ref, cfg["data"]["spacing"], rules,
                               regions=task.outputs))
    if dd.world > 1:
        gathered: list = [None] * dd.world
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    out = {}
    for r in task.outputs:
        out[f"dice_{r}"] = float(np.mean([row[r]["dice"] for row in rows]))
        out[f"hd95_{r}"] = float(np.mean([row[r]["hd95"] for row in rows]))
    out["dice_mean"] = float(np.mean([out[f"dice_{r}"] for r in task.outputs]))
    return out


def _amp_dtype(cfg: dict, device: torch.device, log) -> dict:
    """bf16 only where the GPU supports it (before Ampere: fp16 with loss scaling)."""
    tcfg = cfg["train"]
    if (device.type == "cuda" and tcfg["amp"] and tcfg["amp_dtype"] == "bfloat16"
            and not torch.cuda.is_bf16_supported()):
        log(f"{torch.cuda.get_device_name(device)} has no bfloat16: training in float16 with loss scaling")
        return dict(cfg, train=dict(tcfg, amp_dtype="float16"))
    if device.type == "cpu" and tcfg["amp"] and not cpu_bf16_native():
        log("this CPU has no native bfloat16 (it would be emulated, many times slower): autocast is off, "
            "training and validation run in float32")
    return cfg


# ----------------------------------------------------------------------------- the loop
@dataclass
class _Run:
    """What one fold's training holds between its steps."""
    dev: torch.device
    dd: Dist
    log: Callable[[str], None]
    cfg: dict                 # what the user asked (stored, compared on resume)
    run_cfg: dict             # what runs (e.g. fp16 where the GPU has no bf16)
    data: FoldData
    out_dir: Path
    seed: int


def _start(cfg: dict, out_dir: Path, device: str | None, distributed: bool | None, resume: bool,
           datalist, data_root, fold: int | None, print_fn) -> _Run:
    """Checks before any work: device and process group, the run folder, the data."""
    if distributed and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise MedsegError("distributed training was requested (multi_gpu_train.json) but this process "
                          "was not started by torchrun; run: torchrun --nproc_per_node N -m monai.bundle "
                          "run training --config_file \"['.../train.json','.../multi_gpu_train.json']\" ...")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dd = _setup_distributed(dev, cfg)
    if dev.type == "cuda" and dd.world > 1:
        dev = torch.device("cuda", dd.local_rank)
        torch.cuda.set_device(dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True     # fixed patch shape: pick the fastest kernels once
    log = print_fn if dd.main else (lambda s: None)
    _check_patch(cfg)
    check_data_cache(cfg)
    modality_dropout(cfg)
    modality_dropout_weight(cfg)
    check_loss(cfg["train"]["loss"])
    if distilling(cfg) and cfg["train"]["loss"]["class_weights"] != "none":
        raise MedsegError("train.loss.class_weights with train.distill: class weights count binary region "
                          "labels, and a distilled target is soft; set train.loss.class_weights=none")
    if cfg["train"]["grad_checkpoint"] and cfg["model"]["name"] != "unet3d":
        raise MedsegError(f"train.grad_checkpoint=true: supported for unet3d, not {cfg['model']['name']}; "
                          "set train.grad_checkpoint=false")
    last = out_dir / CHECKPOINT_DIR / "last.pt"
    if last.exists() and not resume:
        raise MedsegError(f"{out_dir} already holds a training run ({last}); pass --resume to "
                          "continue it, or choose another --out")
    if resume and not last.exists():
        raise MedsegError(f"--resume: no checkpoint {last} to resume from; run without --resume")
    data = fold_data(datalist, data_root, fold, cfg["data"].get("task"))
    if not data.train:
        raise MedsegError(f"fold {fold}: no training cases in {datalist}")
    cfg = with_task(cfg, data.task)
    return _Run(dev, dd, log, cfg, _amp_dtype(cfg, dev, log), data, out_dir, int(cfg["seed"]))


def _loader(run: _Run, cache_dir, on_device: bool, fold: int | None = None):
    """(epoch sampler, the run's one DataLoader, validation dataset, device augmenter)."""
    tcfg = run.run_cfg["train"]
    _seed_all(run.seed)
    train_ds, val_ds = _datasets(run.data, run.cfg, store_root(run.out_dir, cache_dir), run.log,
                                 (run.dd.rank, run.dd.world), ddp_timeout_s(run.cfg), on_device,
                                 fold, run.dev)
    workers = loader_workers(run.cfg, run.dd.world)
    # One loader for the run: workers persist across epochs; each sample's seed
    # (from the sampler) fixes its patch and augmentation, whichever worker makes it.
    sampler = EpochSampler(len(train_ds), tcfg["iters_per_epoch"] * tcfg["batch_size"], run.seed,
                           run.dd.rank, run.dd.world)
    loader = DataLoader(train_ds, batch_size=tcfg["batch_size"], sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=run.dev.type == "cuda",
                        prefetch_factor=4 if workers > 0 else None)
    return sampler, loader, val_ds, train_ds.augmenter if on_device else None


def _model(run: _Run, resume: bool, fold: int | None):
    """(network on the device, its DDP wrapper or itself), from train.init_from when set."""
    _seed_all(run.seed)
    model = build_network(run.cfg, training=True).to(run.dev)
    if run.cfg["train"]["grad_checkpoint"]:
        enable_grad_checkpoint(model)
    if run.run_cfg["train"]["channels_last"]:
        model = model.to(memory_format=torch.channels_last_3d)
    init = initial_weights(run.cfg, fold, run.data.datalist) if not resume else None
    if init is not None:
        # the inference checkpoint (final.pt) has no deep-supervision heads: those start fresh
        missing, unexpected = model.load_state_dict(init[1], strict=False)
        # nor, starting a missing-aware network from a plain one, the FiLM weights (zero)
        if unexpected or any(not (k.startswith("deep_supervision_heads") or k.endswith(".film.weight"))
                             for k in missing):
            raise MedsegError(f"train.init_from: {init[0]} does not fit this network (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]})")
        run.log(f"starting from the weights of {init[0]}")
    if run.dd.world > 1:
        return model, nn.parallel.DistributedDataParallel(
            model, device_ids=[run.dev.index] if run.dev.type == "cuda" else None)
    return model, model


def _optimisation(run: _Run, model: nn.Module, weights: dict | None = None):
    """(loss, optimiser, LR schedule, loss scaler) from the ``train`` values;
    `weights`: the loss's class weights (`class_weights`)."""
    tcfg = run.run_cfg["train"]
    opt = build_optimizer(model.parameters(), run.cfg)
    total_steps = tcfg["epochs"] * tcfg["iters_per_epoch"]
    warmup = tcfg["warmup_epochs"] * tcfg["iters_per_epoch"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, warmup, tcfg["schedule"]))
    # Loss scaling only for fp16 (bf16 has fp32's exponent range and needs none).
    scaler = torch.amp.GradScaler(run.dev.type, enabled=tcfg["amp"] and tcfg["amp_dtype"] == "float16")
    return build_criterion(run.cfg, weights["codes"] if weights else None), opt, sched, scaler


def _checkpoint_meta(run: _Run, fold: int | None) -> dict:
    """What every checkpoint says about its model: network, pipeline spec, labels, data."""
    cfg, tcfg = run.cfg, run.run_cfg["train"]
    return {
        "network": network_spec(cfg),
        "channels": list(CHANNELS), "regions": list(run_task(cfg).outputs), "task": run_task(cfg).to_dict(),
        "label_convention": run.data.convention,
        "spacing": list(cfg["data"]["spacing"]), "roi": list(tcfg["patch"]),
        "pipeline": pipeline_spec(cfg, run.data.convention).to_dict(),
        "infer": dict(cfg["infer"], amp=tcfg["amp"], amp_dtype=tcfg["amp_dtype"]),
        "medseg_version": __version__, "fold": fold, "datalist": str(run.data.datalist),
        "modality_dropout": modality_dropout(cfg), "input_subsets": input_subsets(modality_dropout(cfg)),
        "init_from": str(cfg["train"].get("init_from") or "") or None,
    }


def _resume(run: _Run, model, opt, sched, scaler) -> tuple[int, list[dict], float]:
    """Restore model, optimiser, schedule, scaler and RNG states → (epoch, history, best)."""
    last = run.out_dir / CHECKPOINT_DIR / "last.pt"
    ck = torch.load(last, map_location="cpu", weights_only=True)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    scaler.load_state_dict(ck["scaler"])
    _set_rng_state(ck["rng"])
    if experiment(**ck["config"]) != run.cfg:
        raise MedsegError(f"{last}: the run was started with another configuration; resume "
                          "with the same options (see config.json there) or start a new --out")
    run.log(f"resumed {run.out_dir} at epoch {ck['epoch']}/{run.run_cfg['train']['epochs']}")
    return ck["epoch"], ck["history"], ck["best"]


def _epoch_row(run: _Run, epoch: int, parts: dict, val_ds) -> dict:
    """Train one epoch (re-seeded from (seed, epoch)) and validate when due → its log row."""
    tcfg, dev, dd = run.run_cfg["train"], run.dev, run.dd
    t0 = time.perf_counter()
    _seed_all(run.seed * 100_003 + epoch)
    parts["sampler"].set_epoch(epoch)
    bar = _progress(len(parts["loader"]), f"epoch {epoch + 1}/{tcfg['epochs']}", dd.main)
    loss, data_wait = _train_epoch(parts["train_model"], parts["loader"], parts["loss"], parts["opt"],
                                   parts["sched"], run.run_cfg, dev, deep_supervised(run.cfg), bar,
                                   parts["scaler"], parts["augmenter"])
    if bar is not None:
        bar.close()
    if dd.world > 1:
        t = torch.tensor([loss], device=dev)
        dist.all_reduce(t)
        loss = t.item() / dd.world
    row = {"epoch": epoch + 1, "train_loss": loss, "lr": parts["sched"].get_last_lr()[0], "data_wait": data_wait}
    if dev.type == "cuda":
        row["gpu_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    if len(val_ds) and ((epoch + 1) % tcfg["val_every"] == 0 or epoch + 1 == tcfg["epochs"]):
        row.update(validate(parts["model"], val_ds, run.run_cfg, dev, dd))
    row["seconds"] = time.perf_counter() - t0
    return row


def _after_epoch(run: _Run, row: dict, history: list, best: float, parts: dict, meta: dict,
                 tb, t_start: float, start: int) -> float:
    """Rank 0: checkpoints (last, best), logs, progress line → the best mean Dice so far."""
    epochs = run.run_cfg["train"]["epochs"]
    improved = "dice_mean" in row and row["dice_mean"] > best
    best = row["dice_mean"] if improved else best
    state = {"model": parts["model"].state_dict(), "optimizer": parts["opt"].state_dict(),
             "scheduler": parts["sched"].state_dict(), "scaler": parts["scaler"].state_dict(),
             "epoch": row["epoch"], "history": history, "best": best, "rng": _rng_state(),
             "config": run.cfg, "meta": meta}
    ckpt_dir = run.out_dir / CHECKPOINT_DIR
    if improved:
        _save(state, ckpt_dir / "best.pt")
    _save(state, ckpt_dir / "last.pt")
    # The PNG costs about 0.2 s: redraw it when there is a new validation point.
    _write_logs(history, run.out_dir, plot="dice_mean" in row or row["epoch"] == epochs,
                regions=run_task(run.cfg).outputs)
    tb.log(row)
    done = row["epoch"]
    eta = (time.perf_counter() - t_start) / (done - start) * (epochs - done)
    vals = ("  ".join(f"{r} {row[f'dice_{r}']:.3f}" for r in run_task(run.cfg).outputs)
            if "dice_mean" in row else "")
    if vals or done == start + 1 or sys.stderr.isatty():
        run.log(f"epoch {done:>3}/{epochs}  loss {row['train_loss']:.4f}  lr {row['lr']:.2e}  "
                f"{row['seconds']:.1f} s  ETA {eta / 60:.1f} min  {vals}".rstrip())
    return best


def _finish(run: _Run, meta: dict, summary: dict) -> None:
    """Rank 0: the inference checkpoint final.pt (no deep-supervision heads, so the
    weights load strictly into `build_network(cfg)`, the bundle's network_def) and
    ``train_summary.json``, written last."""
    ckpt_dir = run.out_dir / CHECKPOINT_DIR
    final = torch.load(ckpt_dir / "last.pt", map_location="cpu", weights_only=True)
    weights = {k: v for k, v in final["model"].items() if not k.startswith("deep_supervision_heads")}
    _save({"model": weights, "meta": meta, "config": run.cfg, "epoch": final["epoch"]}, ckpt_dir / "final.pt")
    write_json(summary, run.out_dir / "train_summary.json")


def _precision(run: _Run) -> str:
    """The arithmetic training runs in, as the log says it."""
    tcfg = run.run_cfg["train"]
    if not tcfg["amp"] or (run.dev.type == "cpu" and not cpu_bf16_native()):
        return "float32"
    return tcfg["amp_dtype"]


def train_fold(cfg: dict, datalist: str | Path, data_root: str | Path, fold: int | None,
               out_dir: str | Path, resume: bool = False, device: str | None = None,
               print_fn: Callable[[str], None] = print, cache_dir: str | Path | None = None,
               distributed: bool | None = None) -> dict:
    """Train one fold; returns the summary also written to ``train_summary.json``.

    Under `torchrun` (``WORLD_SIZE`` > 1) training is distributed; `distributed=True`
    (the bundle's multi_gpu_train.json) makes a launch without torchrun an error
    instead of a silent single-process run."""
    run = _start(cfg, Path(out_dir), device, distributed, resume, datalist, data_root, fold, print_fn)
    cfg = run.cfg      # with data.task resolved
    tcfg, dd = run.run_cfg["train"], run.dd
    on_device = augment_on_device(cfg, run.dev)
    sampler, loader, val_ds, augmenter = _loader(run, cache_dir, on_device, fold)
    model, train_model = _model(run, resume, fold)
    weights = class_weights(cfg, loader.dataset.store, loader.dataset.case_ids)
    if weights:
        run.log("class-weighted cross-entropy (" + weights["rule"] + "): " + ", ".join(
            f"{k} {v['weight']:.2f}" for k, v in weights["classes"].items()))
    loss_fn, opt, sched, scaler = _optimisation(run, model, weights)
    parts = {"model": model, "train_model": train_model, "loss": loss_fn, "opt": opt, "sched": sched,
             "scaler": scaler, "sampler": sampler, "loader": loader, "augmenter": augmenter}
    meta = _checkpoint_meta(run, fold)
    meta["loss"] = dict(cfg["train"]["loss"], class_weights_applied=weights["classes"] if weights else None)
    if loader.dataset.teacher is not None:
        meta["distill"] = loader.dataset.teacher
        run.log(f"distilling from {meta['distill']['run']} fold(s) {meta['distill']['folds']}: target = "
                f"{1 - meta['distill']['weight']:.2f} x labels + {meta['distill']['weight']:.2f} x teacher")
    start, history, best = _resume(run, model, opt, sched, scaler) if resume else (0, [], -1.0)
    if dd.main:
        write_json(cfg, run.out_dir / "config.json")
        write_json(_environment(), run.out_dir / "env.json")
    tb = _TensorBoard(run.out_dir / "tensorboard", start) if dd.main else None
    net = cfg["model"]
    run.log(f"fold {fold}: {len(run.data.train)} training, {len(run.data.val)} validation cases; "
            f"{net['name']} {net['args']}, patch {tcfg['patch']}, batch {tcfg['batch_size']}"
            f"{f' x {dd.world} ranks' if dd.world > 1 else ''}, {tcfg['epochs']} epochs x "
            f"{tcfg['iters_per_epoch']} iterations, {run.dev.type} {_precision(run)}"
            f"{', augmentation on ' + run.dev.type if on_device else ''}")
    t_start = time.perf_counter()
    for epoch in range(start, tcfg["epochs"]):
        row = _epoch_row(run, epoch, parts, val_ds)
        history.append(row)
        if dd.main:
            best = _after_epoch(run, row, history, best, parts, meta, tb, t_start, start)
        if dd.world > 1:
            dist.barrier()
    summary = {"fold": fold, "epochs": tcfg["epochs"], "best_dice_mean": best,
               "final": history[-1] if history else {}, "seconds": time.perf_counter() - t_start,
               "train_cases": len(run.data.train), "val_cases": len(run.data.val), "world_size": dd.world}
    if dd.main:
        _finish(run, meta, summary)
        if tb is not None:
            tb.close()
    if dd.world > 1:
        dist.barrier()
    return summary
