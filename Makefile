# medseg: the two commands of the README, each doing its own idempotent set-up.
#   make demo   synthetic BraTS-like data → check → 5-fold split → 5-fold cross-validation (cpu preset, about 20 min on 2 cores)
#   make test   the default test suite (slow tests: make test-slow)
#   make demo-raw   after make demo: raw scanner studies generated, identified, registered, predicted on their native series (about 10 min)
#   make demo-missing   after make demo: the missing-modality model (fine-tuned with modality dropout) and its 15-subset table (about 40 min)
# torch is installed first (TORCH_SPEC), so a CPU machine never pulls CUDA wheels.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo_data/brats2023
PY := $(VENV)/bin/python
MEDSEG := $(VENV)/bin/medseg

.PHONY: setup demo demo-missing demo-raw test test-slow clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(PY) -m medseg demo --out $(DEMO_DIR)

demo-missing: setup
	$(PY) -m medseg cv --datalist data_lists/demo_brats2023.json --data-root $(DEMO_DIR) --preset cpu \
	    --set train.init_from=runs/demo_cpu --set train.modality_dropout=0.3 --set model.args.missing_aware=true \
	    --set train.modality_dropout_weight=0.3 \
	    --set train.lr=0.001 --set train.warmup_epochs=0 --out runs/demo_missing
	$(PY) benchmarks/missing_modality.py --run runs/demo_missing --baseline runs/demo_cpu \
	    --datalist data_lists/demo_brats2023.json --data-root $(DEMO_DIR) --out runs/missing_modality.json

demo-raw: setup
	@test -d runs/demo_cpu || { echo "make demo-raw uses the demo model: run make demo first"; exit 2; }
	$(PY) benchmarks/raw_study.py --studies 3 --model runs/demo_cpu --out runs/demo_raw
	$(MEDSEG) study runs/demo_raw/data/studies/RAW-00000
	$(MEDSEG) predict --raw --input runs/demo_raw/data/studies --model runs/demo_cpu --out runs/demo_raw/masks

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) demo_data runs
