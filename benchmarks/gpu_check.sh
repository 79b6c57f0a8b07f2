#!/usr/bin/env bash
# GPU readiness check, for a machine with an NVIDIA GPU (never a test dependency).
# About 5-7 minutes: synthetic BraTS-size cases → preprocessed dataset → augmentation
# cost per 128³ sample (worker vs GPU) → a short
# full-preset training (it/s, GPU memory, loader wait) → one case predicted with
# 1 and 5 models, with and without TTA → ONNX with the CUDA and TensorRT providers →
# gradient checkpointing of the full preset (memory, time).
#
#   bash benchmarks/gpu_check.sh              # figures printed; JSON in $OUT or the work folder
#
# Uses the Python that has a CUDA build of torch: $PY, else .venv/bin/python, else
# python3; installs medseg into it without dependencies when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    PY=.venv/bin/python
  else
    PY=python3
  fi
fi
"$PY" -c "import medseg" 2>/dev/null || "$PY" -m pip install -q --no-deps -e . || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__)"
"$PY" benchmarks/gpu_check.py "$@"
# gradient checkpointing of the full preset (128³, batch 2): GPU memory and time, with and without
"$PY" benchmarks/grad_checkpoint.py --out "${OUT:-.}/grad_checkpoint.json"
