# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test

install:
	$(PIP) install -q -r requirements-dev.txt
	bash tools/install_system_deps.sh

demo: install
	bash examples/demo.sh

test: install
	$(PYTHON) -m pytest -q -p no:cacheprovider tests
