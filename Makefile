# make run     start the panel, the workers and the scheduler under supervisord
#              (scripts/run.sh); settings come from the environment and .env
# make test    run the test suite; FULL=1 make test runs the larger cases, and
#              PYTEST_ARGS="-m unit" passes options to pytest
# make bench   run the benchmarks in bench/
#
# Each target first creates .venv with $(PYTHON) (3.11 or newer) and installs
# requirements-dev.txt, which includes requirements.txt. The install runs again
# only when the content of those files changes.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
REQUIREMENTS := requirements.txt requirements-dev.txt
REQUIREMENTS_HASH := $(shell cat $(REQUIREMENTS) | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQUIREMENTS_HASH)
PYTEST_ARGS ?=

.PHONY: run test bench venv

run: $(STAMP)
	scripts/run.sh

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	@if [ ! -f bench/__main__.py ]; then \
		echo "error: bench/__main__.py is missing, so there is no benchmark to run"; \
		exit 1; \
	fi
	$(VENV)/bin/python -m bench

venv: $(STAMP)

# The stamp's name carries the requirements' hash, so editing them reinstalls.
$(STAMP):
	@if ! $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
		echo "error: $(PYTHON) is missing or older than Python 3.11;" \
			"install Python 3.11 or newer, or run make PYTHON=/path/to/python3.11"; \
		exit 1; \
	fi
	@if [ ! -x $(VENV)/bin/python ]; then \
		echo "creating $(VENV) with $(PYTHON)"; \
		$(PYTHON) -m venv $(VENV) || { \
			echo "error: $(PYTHON) -m venv failed; on Debian install python3-venv"; \
			rm -rf $(VENV); exit 1; }; \
	fi
	@if ! $(VENV)/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
		echo "error: $(VENV) was created with Python older than 3.11;" \
			"remove $(VENV) and run make again"; \
		exit 1; \
	fi
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		-r requirements-dev.txt
	@rm -f $(VENV)/.installed-*
	@touch $@
