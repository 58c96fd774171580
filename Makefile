# cxr-node: the two commands the README opens with.
#   make run   create .venv if missing, install, upgrade the database, serve with config/local.toml
#              (git-ignored; made from config/local.example.toml on first run, over config/cxr-node.toml)
#   make reload  the running node reads its config file again (SIGHUP)
#   make test  install the test extra (+ Debian peers and PostgreSQL when root with apt), lint, then pytest
#   make lint  ruff alone
# Variables: CONFIG=FILE  the config `make run` and `make reload` use (default config/local.toml)
#            WORKERS=N    pytest-xdist workers for `make test` (default 2; 0 runs the suite in one process)
#            PYTHON=EXE   the interpreter that creates .venv (default python3)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config/local.toml
WORKERS ?= 2
DEBS := dcmtk dicom3tools orthanc pixelmed-apps sqlite3 openssl postgresql chromium chromium-driver

.PHONY: run reload test venv debs bench clean

# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(BIN)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq torch==2.13.0
	$(BIN)/python -m pip install -qq -e '.[test]'
	touch $@

venv: $(BIN)/.installed

debs:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	else echo "not root or no apt-get: tests needing $(DEBS) will skip (and fail under CI=true)"; fi

# A site's own settings, never tracked: only what differs from config/cxr-node.toml.
config/local.toml:
	cp config/local.example.toml $@
	@echo "made $@ (git-ignored, over config/cxr-node.toml): your node's settings go there"

run: venv $(CONFIG)
	$(BIN)/cxr-node --config $(CONFIG) db upgrade
	$(BIN)/cxr-node --config $(CONFIG) serve

# SIGHUP to the node `make run` started (its pid is in the lock file data_dir/.lock-HOST-PORT): it
# reads CONFIG again (docs/operations.md, "Reloading the configuration").
reload: venv $(CONFIG)
	@lock=$$($(BIN)/python -c "import socket, sys; from cxr_node import config; \
	s = config.load(sys.argv[1]); print(s.storage.data_dir / f'.lock-{socket.gethostname()}-{s.node.port}')" \
	$(CONFIG)) && pid=$$(head -1 "$$lock" 2>/dev/null) && [ -n "$$pid" ] && kill -HUP "$$pid" \
	&& echo "sent SIGHUP to cxr-node (pid $$pid); its log says what changed" \
	|| { echo "no running cxr-node for $(CONFIG) (no pid in $$lock)"; exit 1; }

# Two workers, one test file each at a time (--dist loadfile keeps a file's module fixtures in one
# process): most tests wait on subprocesses, so two workers halve the wall time on two cores.
# One torch thread per process unless OMP_NUM_THREADS says otherwise (two workers, each with
# daemons, would otherwise run four busy threads on two cores).
# ruff first (rules and why: pyproject.toml), so CI fails on lint before the slow tests run.
lint: venv
	$(BIN)/ruff check .

test: venv debs lint
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -n $(WORKERS) --dist loadfile

bench: venv debs
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) var .pytest_cache
