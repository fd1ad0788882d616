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

# system tools the tests use: openssl (certificates for the TLS tests), iproute2 (network
# namespaces for the two-host tests); installed once on a fresh Debian machine (as root)
SYSTOOLS := openssl ip
sysdeps:
	@for t in $(SYSTOOLS); do command -v $$t >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then apt-get update && apt-get install -y --no-install-recommends openssl iproute2; fi

$(VENV)/.stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install '$(TORCH_SPEC)'
	$(PIP) install -e '.[dev,nixl,bench]'
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
