# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export COMIC_PIPELINE_HOME ?= $(CURDIR)/.comic_pipeline
export DAGSTER_HOME := $(COMIC_PIPELINE_HOME)/dagster
STAMP := $(VENV)/.installed

.PHONY: install demo test dev bench clean home comics

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch lies on disk; pin it first so nothing pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,comics]'
	touch $(STAMP)

install: $(STAMP)

home:
	mkdir -p $(DAGSTER_HOME)
	test -f $(DAGSTER_HOME)/dagster.yaml || cp dagster_home/dagster.yaml $(DAGSTER_HOME)/dagster.yaml

demo: install home
	$(PY) -m comic_pipeline.demo

test: install
	$(PY) -m pytest

# COMICS real-data benchmark (README "Real comics: COMICS"): fold files from COMICS_FOLDS (comma-separated).
COMICS_FOLDS ?= $(shell ls ../shared/data/comics/*.csv 2>/dev/null | paste -sd, -)
comics: install
	$(PY) -m comic_pipeline.comics_run --folds "$(COMICS_FOLDS)" $(COMICS_ARGS)

dev: install home
	$(VENV)/bin/dagster dev -w workspace.yaml

bench: install
	for script in benchmarks/bench_*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(COMIC_PIPELINE_HOME)
