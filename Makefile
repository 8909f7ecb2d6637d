# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create .venv and install lowbit with its pinned CPU build of PyTorch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo train-demo test lint baselines clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch pinned to the CPU build; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lowbit run recipes/deep_compression/lenet300_100.yaml

train-demo: $(STAMP)
	$(BIN)/lowbit run recipes/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

baselines: $(STAMP)
	$(BIN)/python -m bench.train_baselines

clean:
	rm -rf $(VENV) runs .pytest_cache
