# One entry point for people and CI. Every target sets up .venv first (once,
# and again when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test compose-test protos bench bench-service bench-engine bench-transfer bench-overlap clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/gradpool demo

test: setup
	$(BIN)/python -m pytest -q

# The docker-compose cluster on a real Docker engine: build, up, the checks, down -v.
compose-test: setup
	$(BIN)/python scripts/compose_test.py

protos: setup
	$(BIN)/python scripts/gen_protos.py

# Every benchmark; each prints ratios against a baseline measured in the same run.
bench: bench-service bench-transfer bench-overlap bench-engine

bench-service: setup
	$(BIN)/python bench/service.py

bench-transfer: setup
	$(BIN)/python bench/transfer.py

bench-overlap: setup
	$(BIN)/python bench/overlap.py

# The engine vs hand-written numpy backprop (and PyTorch CPU, when installed:
# $(BIN)/pip install -e '.[bench]').
bench-engine: setup
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) gradpool-out .pytest_cache
