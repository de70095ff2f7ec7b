# One command each; all of them install through scripts/install.sh (idempotent).
PYTHON ?= python3
ARGS ?=

.PHONY: install test test-fast run demo view bench lint-docker

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

# Everything: unit and end-to-end (real runs, servers, clusters, a wheel in a fresh venv). CI runs this.
test: install
	$(PYTHON) -m pytest -q -n 2 --dist loadfile

# Unit tests only (pure modules in this process), for the edit-test loop: seconds, not minutes.
test-fast: install
	$(PYTHON) -m pytest -q -m "not e2e"

run: install
	$(PYTHON) -m ambasync run $(ARGS)

demo: install
	$(PYTHON) -m ambasync demo $(ARGS)

# The demo's mirror with its cube (the real Nrp1 and Pdyn grids among synthetic ones), then the
# viewer on it with the DSURQE labels of tests/fixtures.
view: install
	test -f demo/cube.zarr/zarr.json || AMBASYNC_REFERENCE_DIR=tests/fixtures \
		$(PYTHON) -m ambasync demo --out demo --formats minc,cube --sagittal 4 -q
	$(PYTHON) -m ambasync view --out demo --labels tests/fixtures/mhts/DSURQE_CCFv3_labels_200um.mnc \
		--label-names tests/fixtures/mhts/DSURQE_40micron_R_mapping_long.csv $(ARGS)

bench:
	PYTHON=$(PYTHON) bash scripts/install.sh --with-bench
	$(PYTHON) -m bench $(ARGS)

lint-docker: install
	hadolint --failure-threshold warning Dockerfile
