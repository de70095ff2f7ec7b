# One command each; all of them install through scripts/install.sh (idempotent).
PYTHON ?= python3
ARGS ?=

.PHONY: install test run demo bench lint-docker

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

test: install
	$(PYTHON) -m pytest -q

run: install
	$(PYTHON) -m ambasync run $(ARGS)

demo: install
	$(PYTHON) -m ambasync demo $(ARGS)

bench:
	PYTHON=$(PYTHON) bash scripts/install.sh --with-bench
	$(PYTHON) -m bench $(ARGS)

lint-docker: install
	hadolint --failure-threshold warning Dockerfile
