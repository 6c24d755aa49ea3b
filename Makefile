# One entry point for people and CI. Every target sets up .venv first (once,
# and again when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test compose-test protos bench clean

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

bench: setup
	$(BIN)/python bench/service.py

clean:
	rm -rf $(VENV) gradpool-out .pytest_cache
