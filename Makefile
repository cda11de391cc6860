# The two commands: `make run` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_HOME := $(CURDIR)/.flwr

.PHONY: run test lint clean

# pip's own lines say what it fetches and installs; its progress bars only on a terminal (a log gets lines).
$(INSTALLED): pyproject.toml
	@echo "make: installing fedmeta and its dependencies (PyTorch, Flower, Opacus, ...) into $(VENV); minutes the first time"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ -t 1 ]; then bar=on; else bar=off; fi; $(BIN)/python -m pip install --progress-bar $$bar -e '.[dev]'
	@echo "make: $(VENV) is ready"
	touch $@

# 10 synthetic hospitals (written on first use), 4 sampled per round, DP on; then the results table.
run: $(INSTALLED)
	rm -rf runs/demo
	$(BIN)/fedmeta simulate --hospitals 10 --rounds 30 --clients-per-round 4 --out runs/demo --set server.eval-every=10

test: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(INSTALLED)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .flwr .fedmeta runs
