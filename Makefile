# Entry points: `make train` (main job on the built-in default), `make test`, and `make device-check`
# (GPU check, scripts/device_check.sh: results under device_check/<time>/; ARGS="--cifar DIR").
# Both create an isolated environment in .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

.PHONY: install train test device-check
install: $(BIN)/.installed

train: install
	$(BIN)/python train.py fit -c configs/default.yaml $(ARGS)

test: install
	WANDB_MODE=disabled $(BIN)/python -m pytest -q $(ARGS)

device-check: install
	scripts/device_check.sh --python $(BIN)/python $(ARGS)
