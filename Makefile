# ebroker — every target installs what it needs first: the venv in .venv, and for
# `make test` the system programs the suite runs (installed with apt-get when
# make runs as root; otherwise the tests that need them are skipped, and the run
# says what to install).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/ebroker.toml
APT_GET := DEBIAN_FRONTEND=noninteractive apt-get -qq -o=Dpkg::Use-Pty=0
CAN_APT = [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null

.PHONY: install install-cli system-packages run test stress lint fmt bench cov check clean

# `make install-cli` (and `make run`) put `ebroker` on PATH: a symlink to the
# venv's script in $(PREFIX)/bin when root, else in ~/.local/bin. CLI_DIR picks
# another directory; FORCE=1 replaces a different file already there.
PREFIX ?= /usr/local
CLI_DIR ?= $(if $(filter 0,$(shell id -u)),$(PREFIX)/bin,$(HOME)/.local/bin)
FORCE ?=

# Debian's Python keeps venv (ensurepip) in its own package, python3-venv.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  if $(CAN_APT); then \
	    echo "==> installing python3-venv (Debian's Python needs it for the venv)"; \
	    $(APT_GET) update && $(APT_GET) install -y --no-install-recommends python3-venv; \
	  else \
	    echo "==> $(PYTHON) has no venv module: run 'apt-get install -y python3-venv' as root" >&2; \
	    exit 1; \
	  fi; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

install-cli: $(STAMP)
	@target="$(abspath $(BIN))/ebroker"; dir="$(CLI_DIR)"; link="$$dir/ebroker"; \
	mkdir -p "$$dir" || exit 1; \
	if [ -L "$$link" ] && [ "$$(readlink "$$link")" = "$$target" ]; then \
	  echo "==> $$link already links to $$target"; \
	elif [ -e "$$link" ] && [ ! -L "$$link" ] && [ -z "$(FORCE)" ]; then \
	  echo "==> $$link exists and is not a link to this checkout: left alone." >&2; \
	  echo "    Run $$target directly, or replace it: make install-cli FORCE=1" >&2; \
	else \
	  if [ -L "$$link" ] || [ -e "$$link" ]; then \
	    echo "==> replacing $$link (was $$(readlink "$$link" || echo 'a file'))"; \
	  fi; \
	  ln -sfn "$$target" "$$link" && echo "==> linked $$link -> $$target"; \
	fi; \
	case ":$$PATH:" in *":$$dir:"*) ;; *) \
	  echo "==> $$dir is not on your PATH; add this line to ~/.profile (or ~/.bashrc):"; \
	  echo "    export PATH=\"$$dir:\$$PATH\"";; \
	esac

system-packages:
	@missing="$$($(PYTHON) tests/system_tools.py missing)"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if $(CAN_APT); then \
	  echo "==> installing system packages the tests run: $$missing"; \
	  { $(APT_GET) update && $(APT_GET) install -y --no-install-recommends $$missing; } \
	    || echo "==> apt-get failed; the tests that need $$missing will be skipped"; \
	else \
	  echo "==> not root or no apt-get: the tests that need $$missing will be skipped;"; \
	  echo "    install them with: sudo apt-get install -y $$missing"; \
	fi

run: install-cli
	$(BIN)/ebroker serve --config $(CONFIG)

test: $(STAMP) system-packages
	$(BIN)/python -m pytest

# The whole suite RUNS times in a row while a busy loop keeps every core busy:
# a test that depends on timing shows up here, not later in someone's CI.
RUNS ?= 5
stress: $(STAMP) system-packages
	$(BIN)/python -m tests.stress --runs $(RUNS)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The benchmarks load the daemon with wrk (HTTP) and with a client compiled by
# cc (EGD); as root with apt-get they are installed when missing, otherwise the
# benchmarks that need them are skipped. BENCH_ARGS picks benchmarks and
# options: make bench BENCH_ARGS="egd http --json bench.json".
BENCH_ARGS ?=
bench: $(STAMP)
	@missing=""; \
	command -v wrk >/dev/null || missing="wrk"; \
	command -v cc >/dev/null || command -v gcc >/dev/null || missing="$$missing gcc"; \
	if [ -n "$$missing" ]; then \
	  if $(CAN_APT); then \
	    echo "==> installing what the benchmarks run: $$missing"; \
	    { $(APT_GET) update && $(APT_GET) install -y --no-install-recommends $$missing; } \
	      || echo "==> apt-get failed; the benchmarks that need $$missing will be skipped"; \
	  else \
	    echo "==> not root or no apt-get: the benchmarks that need $$missing will be skipped;"; \
	    echo "    install them with: sudo apt-get install -y $$missing"; \
	  fi; \
	fi
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

cov: $(STAMP) system-packages
	$(BIN)/python -m pytest --cov=broker --cov=sources --cov=sinks --cov-branch

check: lint test

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis var
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
