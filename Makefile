# One-command entry points. Every target installs what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install test demo lint format coco clean bench

# Re-installs only when pyproject.toml changed since the last install.
$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(INSTALLED)

install: $(INSTALLED)

test: install
	$(PY) -m pytest

DEMO_PROMPT ?= a small red circle on a blue background

# Data → VAE → U-Net → samples → adherence evaluation, then a summary (times, table, grid).
demo: install
	$(PY) demo.py --prompt "$(DEMO_PROMPT)"

# Every benchmark at sizes for the detected device → benchmarks/RESULTS.md (a few minutes on a
# 2-core CPU). BENCH_ARGS passes flags on, e.g. make bench BENCH_ARGS="--device cpu".
bench: install
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

coco: install
	$(PY) -m ldm.data.coco_download --root data/coco

clean:
	rm -rf runs data/synthetic data/cache .pytest_cache .ruff_cache
