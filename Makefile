# One command each; all of them install through scripts/install.sh (idempotent).
PYTHON ?= python3
ARGS ?=

.PHONY: install test test-fast run demo bench lint-docker

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

# Everything: unit and end-to-end (real runs, servers, clusters, a wheel in a fresh venv). CI runs this.
test: install
	$(PYTHON) -m pytest -q

# Unit tests only (pure modules in this process), for the edit-test loop: seconds, not minutes.
test-fast: install
	$(PYTHON) -m pytest -q -m "not e2e"

run: install
	$(PYTHON) -m ambasync run $(ARGS)

demo: install
	$(PYTHON) -m ambasync demo $(ARGS)

bench:
	PYTHON=$(PYTHON) bash scripts/install.sh --with-bench
	$(PYTHON) -m bench $(ARGS)

lint-docker: install
	hadolint --failure-threshold warning Dockerfile
