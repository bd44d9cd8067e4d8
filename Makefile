# The two set-up commands of the README: `make demo` (train the quickstart agent) and `make test`.
# Both create .venv and install what they need (torch==2.13.0 CPU first, never a CUDA build).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test install lint format bench clean

$(BIN)/.installed: pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install.sh
	touch $@

install: $(BIN)/.installed

# Each demo gets its own run directory, so running it twice never collides with (or loses) a run.
demo: install
	$(BIN)/treegrpo train --set name=quickstart-$$(date +%Y%m%d-%H%M%S)

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff format --check src tests benchmarks && $(BIN)/ruff check src tests benchmarks

format: install
	$(BIN)/ruff format src tests benchmarks && $(BIN)/ruff check --fix src tests benchmarks

bench: install
	$(BIN)/python benchmarks/run_all.py --json

clean:
	rm -rf $(VENV) runs .cache
