# Two commands do everything on a fresh machine: `make repro` and `make test`.
# Neither writes a tracked file of its own; `make timing-table` publishes make repro's stage times (README).
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

.PHONY: setup repro timing-table chromium openssh-server test test-fast bench report results preset clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -r requirements.txt || { \
	  echo "make setup: 'pip install -r requirements.txt' failed. The venv needs about 6.5 GB of disk" >&2; \
	  echo "(torch 2.14.1 is a CUDA build); free space here:" >&2; df -h . >&2; exit 1; }
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Prints each stage's wall time; keeps the record in timings/ (git-ignored): no tracked file changes.
repro: setup
	$(BIN)/python -m bench.repro_timing

# Copies the last full `make repro` on the synthetic default into README.md and bench/repro_timing.json.
timing-table: setup
	$(BIN)/python -m bench.repro_timing --write-readme

# The browser tests (tests/test_flows_server.py: the Prefect UI; tests/test_report.py: the HTML report) drive
# Debian's headless Chromium at /usr/bin/chromium. Installed here when missing and make runs as root;
# otherwise make stops with the command to run.
CHROMIUM := /usr/bin/chromium
USER_ID ?= $(shell id -u)

chromium:
	@if [ -x "$(CHROMIUM)" ]; then exit 0; fi; \
	if [ "$(USER_ID)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make: $(CHROMIUM) is missing; installing Debian's chromium for the browser tests"; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "make: $(CHROMIUM) is missing and the browser tests need it (tests/test_flows_server.py," >&2; \
	  echo "tests/test_report.py). Install it, then run make again:" >&2; \
	  echo "    sudo apt-get update && sudo apt-get install -y chromium" >&2; \
	  exit 1; \
	else \
	  echo "make: $(CHROMIUM) is missing and the browser tests need it (tests/test_flows_server.py," >&2; \
	  echo "tests/test_report.py); this is not a Debian/Ubuntu system (no apt-get): install Chromium so that" >&2; \
	  echo "$(CHROMIUM) runs it, then run make again" >&2; \
	  exit 1; \
	fi
	@test -x "$(CHROMIUM)" || { echo "make: installing chromium did not provide $(CHROMIUM)" >&2; exit 1; }

# The SSH-remote test (tests/test_multi_machine_ssh.py) starts Debian's OpenSSH server (/usr/sbin/sshd) on 127.0.0.1
# with a key it makes; DVC reaches it through dvc-ssh (requirements.txt). Installed here when missing and make runs as root.
SSHD := /usr/sbin/sshd

openssh-server:
	@if [ -x "$(SSHD)" ] && command -v ssh-keygen >/dev/null 2>&1; then exit 0; fi; \
	if [ "$(USER_ID)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make: $(SSHD) is missing; installing Debian's openssh-server for the SSH-remote test"; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y openssh-server openssh-client; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "make: $(SSHD) is missing and the SSH-remote test needs it (tests/test_multi_machine_ssh.py). Install it, then run make again:" >&2; \
	  echo "    sudo apt-get update && sudo apt-get install -y openssh-server openssh-client" >&2; \
	  exit 1; \
	else \
	  echo "make: $(SSHD) is missing and the SSH-remote test needs it (tests/test_multi_machine_ssh.py); this is not a" >&2; \
	  echo "Debian/Ubuntu system (no apt-get): install an OpenSSH server so that $(SSHD) runs it, then run make again" >&2; \
	  exit 1; \
	fi
	@test -x "$(SSHD)" || { echo "make: installing openssh-server did not provide $(SSHD)" >&2; exit 1; }

# Three pytest-xdist workers on CI's two cores: most tests wait on stage subprocesses, Prefect servers, workers'
# polls and heartbeats, and a third worker fills those waits. Measured on 2 cores (2026-12-04, 720 tests): 872 and
# 821 s with three (CPU 183-184 % busy) against 925 s with two (156 %). The tests that share a trained tiny project
# stay on one worker, and the longest scheduling groups start first (tests/conftest.py). Each stage process spends
# ~4 s of CPU importing torch, torchvision and timm: that, not waiting, is now most of the suite.
PYTEST_WORKERS ?= 3

test: setup chromium openssh-server
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadscope

test-fast: setup chromium
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadscope -m "not slow"

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
