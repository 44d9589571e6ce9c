# The two commands a newcomer runs: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TC01 := .venv-tc01/.installed
TORCH := torch==2.13.0

.PHONY: demo test lint bench bench-quick interop clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test,torch,tools]'
	touch $(STAMP)

## demo: start a synthetic image server, read from it for a few seconds, print batches/s and GB/s
demo: $(STAMP)
	$(BIN)/tensorcom demo --seconds 5
	$(BIN)/python -m tensorcom.examples.imagenet_demo

## demo-imagenet: serve generated JPEGs with serve-imagenet-dir, train a small CNN, checkpoint, resume, print images/s
.PHONY: demo-imagenet
demo-imagenet: $(STAMP)
	$(BIN)/python -m tensorcom.examples.imagenet_demo

## test: lint, type-check and run the whole test suite (the interop tests against tensorcom 0.1 included: they run
## in the original's own environment, .venv-tc01, which this target builds)
test: $(STAMP) $(TC01)
	@# tests/test_multihost.py builds test hosts with iproute2 (it skips without root or `ip`): install it if we can
	@command -v ip >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq iproute2) || echo "iproute2 not installed: multi-host tests skip"
	$(BIN)/ruff check tensorcom servers tools tests benchmarks examples
	$(BIN)/mypy
	TENSORCOM_01_PYTHON=$(CURDIR)/.venv-tc01/bin/python $(BIN)/pytest -q

## test-slow: the long fuzz, fault and load runs (the `slow` marker), which `make test` leaves out
.PHONY: test-slow
test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow --timeout 900

lint: $(STAMP)
	$(BIN)/ruff check tensorcom servers tools tests benchmarks examples
	$(BIN)/ruff format --check tensorcom servers tools tests benchmarks examples
	$(BIN)/mypy

## bench: the benchmark suite (several minutes): benchmarks/results/latest.{json,md,png}; bench-quick: about 3 minutes
bench: $(STAMP) $(TC01)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	TENSORCOM_01_PYTHON=$(CURDIR)/.venv-tc01/bin/python $(BIN)/python benchmarks/suite.py

bench-quick: $(STAMP) $(TC01)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	TENSORCOM_01_PYTHON=$(CURDIR)/.venv-tc01/bin/python $(BIN)/python benchmarks/suite.py --quick

# tensorcom 0.1.0 has our package name, so it lives in its own environment (the incumbent in benchmarks and interop)
$(TC01):
	test -x .venv-tc01/bin/python || $(PYTHON) -m venv .venv-tc01
	.venv-tc01/bin/pip install --quiet $(TORCH) 'tensorcom==0.1.0'
	touch $(TC01)

## attacks: issue 21's attacks on real servers and clients, measured (a few minutes): RELIABILITY.md's "Attacks"
.PHONY: attacks
attacks: $(STAMP)
	$(BIN)/python benchmarks/attacks.py

## interop: check the wire format against tensorcom 0.1 installed in its own virtual environment
interop: $(STAMP) $(TC01)
	TENSORCOM_01_PYTHON=$(CURDIR)/.venv-tc01/bin/python $(BIN)/pytest -q tests/test_interop.py

clean:
	rm -rf $(VENV) .venv-tc01 build *.egg-info .pytest_cache .mypy_cache .ruff_cache
