# The two commands of the README: `make demo` (set up + run the main job) and `make test`.
# Both are idempotent: the virtual environment is (re)built only when requirements change.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FP     := $(VENV)/bin/finpercep
DEMO   ?= runs/demo

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

demo: setup
	$(FP) photos fetch --out $(DEMO)/photos
	$(FP) data build --images $(DEMO)/photos/train --out $(DEMO)/fgr --num 64 --workers 2
	$(FP) data show $(DEMO)/fgr --num 16 --to $(DEMO)/fgr/sheet.png
	$(FP) score $(DEMO)/fgr/samples/0000/s000000[0-7]_syn.png $(DEMO)/photos/test --overlay $(DEMO)/overlays --maps $(DEMO)/maps
	@echo "reward-map overlays: $(DEMO)/overlays/"

test: setup
	@bash tools/ensure_chromium.sh
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
