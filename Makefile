# The two commands of the README. Both create .venv with pip (torch pinned to the CPU wheel in pyproject.toml).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint

$(BIN)/abmll: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/abmll

demo: install
	$(BIN)/abmll demo --preset quick --out runs/demo-quick

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/abmll fetch
	$(BIN)/pytest -q
