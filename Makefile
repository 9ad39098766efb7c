# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-python demo test test-fast

install-python:
	$(PIP) install -q -r requirements-dev.txt

install: install-python
	bash tools/install_system_deps.sh

demo: install-python
	bash examples/demo.sh

test: install
	$(PYTHON) -m pytest -q -p no:cacheprovider --durations=25 tests

# Inner loop: in-process unit tests only (no torchrun worlds, no Slurm); the full suite is `make test`.
test-fast: install-python
	$(PYTHON) -m pytest -q -p no:cacheprovider -m unit tests
