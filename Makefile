# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export COMIC_PIPELINE_HOME ?= $(CURDIR)/.comic_pipeline
export DAGSTER_HOME := $(COMIC_PIPELINE_HOME)/dagster
STAMP := $(VENV)/.installed

.PHONY: install demo test dev mlflow bench clean home comics

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch lies on disk; pin it first so nothing pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	# the tested pins (constraints.txt, Python 3.11); the prod extra: the prod tests need it;
	# the comics extra: the offline sentence encoder of the COMICS import
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,prod,comics]'
	touch $(STAMP)

install: $(STAMP)

home:
	mkdir -p $(DAGSTER_HOME)
	test -f $(DAGSTER_HOME)/dagster.yaml || cp dagster_home/dagster.yaml $(DAGSTER_HOME)/dagster.yaml

demo: install home
	$(PY) -m comic_pipeline.demo

# Two lanes (comic_pipeline_tests/conftest.py): the browser test beside the rest.
test: install
	$(PY) -m pytest -n 2

# COMICS real-data benchmark (README "Real comics: COMICS"): fold files from COMICS_FOLDS (comma-separated).
COMICS_FOLDS ?= $(shell ls ../shared/data/comics/*.csv 2>/dev/null | paste -sd, -)
comics: install
	$(PY) -m comic_pipeline.comics_run --folds "$(COMICS_FOLDS)" $(COMICS_ARGS)

# `make dev PORT=3101`; runs link to the MLflow UI that `make mlflow` serves on MLFLOW_PORT.
PORT ?= 3000
MLFLOW_PORT ?= 5000
dev: install home
	COMIC_MLFLOW_UI_URL=$${COMIC_MLFLOW_UI_URL:-http://127.0.0.1:$(MLFLOW_PORT)} $(VENV)/bin/dagster dev -w workspace.yaml -p $(PORT)

mlflow: install
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui -h 127.0.0.1 -p $(MLFLOW_PORT) \
		--backend-store-uri sqlite:///$(COMIC_PIPELINE_HOME)/mlflow.db

bench: install
	for script in benchmarks/bench_*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(COMIC_PIPELINE_HOME)
