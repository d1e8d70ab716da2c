# farmnode — the README's commands are targets here.
#   make demo    a real agent under a real systemd running a real multi-frame job
#   make check   every test: lint, type check, host tests, system tests in a booted container
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := debootstrap systemd-container qemu-system-x86 libsystemd-dev pkg-config gcc \
	python3-dev python3-venv

.PHONY: setup apt lint test-host test-system test-vm check demo clean

$(VENV)/.stamp: pyproject.toml
	@command -v debootstrap >/dev/null && command -v systemd-nspawn >/dev/null \
	  && command -v qemu-system-x86_64 >/dev/null \
	  && [ -e /usr/include/systemd/sd-journal.h ] || $(MAKE) apt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.stamp

apt:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES)

lint: setup
	$(VENV)/bin/ruff check farmnode tests tools
	$(VENV)/bin/mypy farmnode

test-host: setup
	$(VENV)/bin/pytest -q -m "not system and not vm" tests

test-system: setup
	$(PY) tools/container.py build >/dev/null
	FARMNODE_FLEET=1 $(VENV)/bin/pytest -q tests/system

test-vm: setup
	$(PY) tools/vm.py build >/dev/null
	$(VENV)/bin/pytest -q -s tests/vm

check: lint test-host test-system test-vm

demo: setup
	$(PY) tools/container.py build >/dev/null
	$(PY) tools/demo.py

clean:
	rm -rf $(VENV) build dist *.egg-info
