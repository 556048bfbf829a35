# Two commands do everything on a fresh machine: `make repro` and `make test`.
# The venv is rebuilt only when requirements.txt or pyproject.toml change (stamp file).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed.stamp

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME := $(CURDIR)/.prefect
export PYTHONUNBUFFERED := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup repro test test-fast bench report results preset clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -r requirements.txt || { \
	  echo "make setup: 'pip install -r requirements.txt' failed. The venv needs about 6.5 GB of disk" >&2; \
	  echo "(torch 2.14.1 is a CUDA build); free space here:" >&2; df -h . >&2; exit 1; }
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

repro: setup
	$(BIN)/python -m bench.repro_timing

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python -m bench.run

report: setup
	$(BIN)/python -m pipeline.report

# make preset PRESET=configs/voc.yaml : merge a paper preset over params.yaml (validated, atomic)
preset: setup
	@test -n "$(PRESET)" || { echo "usage: make preset PRESET=configs/voc.yaml" >&2; exit 2; }
	$(BIN)/python -m weakclip_core.config.presets apply $(PRESET)

results: setup
	$(BIN)/python -m pipeline.summary

clean-venv:
	rm -rf $(VENV)
