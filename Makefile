# Two commands: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-rl demo-distill test test-slow clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tinygpt pipeline --preset demo --out runs/demo

demo-rl: $(STAMP)
	$(VENV)/bin/tinygpt pipeline --preset demo-rl --out runs/demo

demo-distill: $(STAMP)
	$(VENV)/bin/tinygpt pipeline --preset distill --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -x

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
