"""Decisions that make a GPU run work, checked without a GPU: where the volume of a
sliding-window inference lives, the bf16 → fp16 fallback, loader worker counts,
the DDP timeout."""

from __future__ import annotations

import pytest
import torch

from medseg.config import resolve_config
from medseg.errors import MedsegError
from medseg.infer import volume_device
from medseg.train import _amp_dtype, ddp_timeout_s, loader_workers

BRATS_1MM = (140, 170, 140)        # a brain box at 1 mm


def test_volume_stays_on_the_gpu_only_when_it_fits():
    cuda = torch.device("cuda", 0)
    assert volume_device(torch.device("cpu"), BRATS_1MM) == torch.device("cpu")
    assert volume_device(cuda, BRATS_1MM, free_bytes=80 * 2**30) == cuda
    assert volume_device(cuda, BRATS_1MM, free_bytes=200 * 2**20).type == "cpu"      # a busy small GPU
    # member statistics (uncertainty) need more room
    need_plain = next(f for f in range(1, 4096) if volume_device(cuda, BRATS_1MM, free_bytes=f * 2**20) == cuda)
    need_stats = next(f for f in range(1, 4096)
                      if volume_device(cuda, BRATS_1MM, True, free_bytes=f * 2**20) == cuda)
    assert need_stats > need_plain


def test_bf16_falls_back_to_fp16_with_loss_scaling_on_older_gpus(monkeypatch):
    cfg = resolve_config("full")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    said = []
    run = _amp_dtype(cfg, torch.device("cuda", 0), said.append)
    assert run["train"]["amp_dtype"] == "float16" and cfg["train"]["amp_dtype"] == "bfloat16"
    assert "V100" in said[0] and "float16" in said[0]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert _amp_dtype(cfg, torch.device("cuda", 0), said.append) is cfg
    assert _amp_dtype(cfg, torch.device("cpu"), said.append) is cfg


def test_loader_workers_default_from_the_cpu_count(monkeypatch):
    cfg = resolve_config("full")
    assert cfg["data"]["num_workers"] is None
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(cfg) == 8                          # at most 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers(cfg) == 3                          # 32 cores shared by 8 ranks, one each for the step
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert loader_workers(cfg, 1) == 0
    assert loader_workers(resolve_config("cpu")) == 0
    with pytest.raises(MedsegError, match="num_workers"):
        loader_workers(resolve_config("full", ["data.num_workers=-2"]))


def test_ddp_timeout_comes_from_the_config_and_old_configs_get_the_default():
    from medseg.config import experiment
    assert ddp_timeout_s(resolve_config("full", ["train.ddp_timeout_min=90"])) == 5400
    old = resolve_config("full")
    del old["train"]["ddp_timeout_min"]
    assert ddp_timeout_s(experiment(**old)) == 1800
    with pytest.raises(MedsegError, match="ddp_timeout_min"):
        ddp_timeout_s(resolve_config("full", ["train.ddp_timeout_min=0"]))


def test_cpu_autocast_only_where_bf16_is_native(monkeypatch):
    # Emulated bf16 convolutions run many times slower than fp32 (measured 25x on an
    # AVX2-only CPU): autocast must then be a no-op, and bf16 where the CPU has it.
    import contextlib
    import medseg.infer as infer
    cpu = torch.device("cpu")
    monkeypatch.setattr(infer, "cpu_bf16_native", lambda: False)
    assert isinstance(infer.autocast(cpu, True), contextlib.nullcontext)
    with infer.autocast(cpu, True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    monkeypatch.setattr(infer, "cpu_bf16_native", lambda: True)
    with infer.autocast(cpu, True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert isinstance(infer.autocast(cpu, False), contextlib.nullcontext)
