# The README's two commands: `make run` and `make test`. Both create .venv when missing and are idempotent.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/replay.toml
# Real assets for tests and `make run`; tests skip what needs them when the folder is absent.
EYED_SHARED ?= $(abspath ../shared)
export EYED_SHARED

.PHONY: run test venv lint bench clean

venv: $(STAMP)

# torch first, pinned: a plain `torch` requirement would pull several GB of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

# The replay config names ../shared; EYED_SHARED moves it.
ifneq ($(EYED_SHARED),$(abspath ../shared))
ifeq ($(CONFIG),configs/replay.toml)
ASSETS := --set source.dataset=$(EYED_SHARED)/data/cifar10 --set model.id=$(EYED_SHARED)/models/mobilenet_v2_1.0_224
endif
endif

run: $(STAMP)
	$(BIN)/eyed run --config $(CONFIG) $(ASSETS)

# pytest exits 5 when it collected no test: that must fail, and so it does (any non-zero exit fails make).
test: $(STAMP)
	$(BIN)/python -m pytest

# mypy checks benchmarks on its own: its scripts import each other as top-level modules, the tests as benchmarks.*.
lint: $(STAMP)
	$(BIN)/ruff check eyed tests benchmarks
	$(BIN)/ruff format --check eyed tests benchmarks
	$(BIN)/mypy eyed tests
	$(BIN)/mypy benchmarks

bench: $(STAMP)
	$(BIN)/eyed bench --config $(CONFIG) $(ASSETS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info
