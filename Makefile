# emtransfer developer tasks. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# A local CPU wheel of torch; installing it before anything else keeps pip from
# pulling gigabytes of CUDA wheels (unpinned torch, or nixl's dependencies).
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test demo lint clean sysdeps

venv: $(VENV)/.stamp

# system packages the tests use: openssl (certificates for the TLS tests), iproute2 (network
# namespaces for the two-host tests), libibverbs1 (loaded by the Mooncake engine, even for
# TCP); only the missing ones are installed, once on a fresh Debian machine (as root)
sysdeps:
	@pkgs=""; \
	command -v openssl >/dev/null || pkgs="$$pkgs openssl"; \
	command -v ip >/dev/null || pkgs="$$pkgs iproute2"; \
	(ldconfig -p 2>/dev/null || /sbin/ldconfig -p) | grep -q libibverbs.so.1 || pkgs="$$pkgs libibverbs1"; \
	if [ -n "$$pkgs" ]; then apt-get update && apt-get install -y --no-install-recommends $$pkgs; fi

$(VENV)/.stamp: pyproject.toml config/engines-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install '$(TORCH_SPEC)'
	$(PIP) install -e '.[dev,nixl,mooncake,bench]'
	$(PIP) install --no-deps -r config/engines-cpu.txt  # vLLM, SGLang: no CUDA torch pulled
	touch $@

test: sysdeps venv
	$(PY) -m pytest -q

demo: venv
	$(PY) -m emtransfer demo

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy emtransfer

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
