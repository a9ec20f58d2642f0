# watcher: `make run` starts a local devnet demo, `make test` runs the whole suite.
# Both set up everything they need first (Python venv, npm tools).

PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: deps system-deps run test conformance lint typecheck bench soak screenshots clean

deps: $(VENV)/.installed node_modules/.installed system-deps

# Debian packages the tests run for real: prometheus (the metrics tests scrape the daemon),
# litecoind (Litecoin Core 0.21, the Bitcoin family's node, in -regtest), and chromium,
# chromium-driver and zbar-tools (the checkout page in a real browser, its QR code decoded),
# nats-server (the nats plugin publishes into a real JetStream).
SYSTEM_PACKAGES := prometheus litecoind chromium chromium-driver zbar-tools nats-server
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v litecoind >/dev/null \
	  && command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v zbarimg >/dev/null \
	  && command -v nats-server >/dev/null || { \
	  echo "installing $(SYSTEM_PACKAGES) (Debian packages) for the tests"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; }

$(VENV)/.installed: pyproject.toml setup.py plugins/bitcoin/_rawscan.c
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "watcher needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

run: deps
	$(BIN)/python -m tests.support.devnet

lint: deps
	$(BIN)/ruff check .

# mypy, configured in pyproject.toml ([tool.mypy]). The EVM plugin is imported as watcher_evm
# from plugins/evm (setuptools package-dir); mypy cannot follow the editable install's import
# hook, so it finds the package through this link (build/ is not committed).
typecheck: deps
	@mkdir -p build/mypy-path && ln -sfn ../../plugins/evm build/mypy-path/watcher_evm \
	  && ln -sfn ../../plugins/bitcoin build/mypy-path/watcher_bitcoin \
	  && ln -sfn ../../plugins/rates_http build/mypy-path/watcher_rates_http \
	  && ln -sfn ../../plugins/checkout build/mypy-path/watcher_checkout \
	  && ln -sfn ../../plugins/nats build/mypy-path/watcher_nats
	$(BIN)/mypy

test: deps lint typecheck
	WATCHER_REQUIRE_PROMETHEUS=1 WATCHER_REQUIRE_BROWSER=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

# The checkout page's screenshots under docs/screenshots (the README shows them), taken by the
# browser tests in headless Chromium.
screenshots: deps
	WATCHER_REQUIRE_BROWSER=1 WATCHER_SCREENSHOTS=$(CURDIR)/docs/screenshots \
	  $(BIN)/python -m pytest -p no:cacheprovider -q tests/test_checkout_browser.py

# The chain-family conformance suite alone (it is part of `make test` too): every family's
# harness in tests/conformance/conftest.py, or one with FAMILY=evm.
conformance: deps
	$(BIN)/python -m pytest -p no:cacheprovider -q tests/conformance $(if $(FAMILY),-k $(FAMILY)) $(PYTEST_ARGS)

bench: deps
	$(BIN)/python -m bench

# The long reliability runs (docs/reliability.md): the crash-and-reorg soak with 1,500
# operations, 20 SIGKILLs and 20 reorgs for each of SOAK_SEEDS, the fault-injecting proxy,
# SQLite trouble, and schemathesis with 120 examples per operation (~5,000 cases).
SOAK_SEEDS ?= 1 2 3
soak: deps
	set -e; for seed in $(SOAK_SEEDS); do \
	  WATCHER_SOAK_SEED=$$seed WATCHER_SOAK_OPS=1500 WATCHER_SOAK_KILLS=20 WATCHER_SOAK_REORGS=20 \
	    $(BIN)/python -m pytest -p no:cacheprovider -q -s tests/test_soak.py $(PYTEST_ARGS); done
	set -e; for seed in $(SOAK_SEEDS); do \
	  WATCHER_SOAK_SEED=$$seed WATCHER_SOAK_OPS=600 WATCHER_SOAK_KILLS=20 WATCHER_SOAK_REORGS=20 \
	    $(BIN)/python -m pytest -p no:cacheprovider -q -s tests/test_soak_litecoin.py $(PYTEST_ARGS); done
	WATCHER_SCHEMATHESIS_EXAMPLES=120 $(BIN)/python -m pytest -p no:cacheprovider -q tests/test_faults.py \
	  tests/test_storage_faults.py tests/test_hostile.py tests/test_api.py::test_schemathesis_finds_no_server_errors \
	  $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) node_modules devnet tests/.cache .pytest_cache build plugins/bitcoin/_rawscan.*.so
