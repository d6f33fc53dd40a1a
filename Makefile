# hived: `make demo` runs a build in a real microVM; `make test` runs every test.
# Both start from a fresh Debian 12 machine (as root): they install what is missing.
#
# Python packages go into a virtual environment in the checkout ($(VENV)), never into the
# system Python (Debian's python3 refuses that: PEP 668). PYTHON is the interpreter the
# venv is made from: `make demo PYTHON=/usr/bin/python3` uses Debian's own.

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
HIVED  := $(VPY) -m hived
# python3-venv, python3-dev and gcc: the venv and the native modules on Debian's python3.
APT_PACKAGES := qemu-system-x86 postgresql debootstrap erofs-utils busybox-static e2fsprogs cpio \
	iproute2 crun wireguard-go wireguard-tools zstd xz-utils \
	docker-registry apache2-utils openssl python3-venv python3-dev gcc systemd
PYTEST_ARGS ?=

# `make install`: the package (with its native modules) into its own venv at PREFIX,
# the command at BINDIR/hived, the systemd units into UNITDIR, example configs into
# CONFDIR/*.example. Every directory can be moved (the tests install into a temp dir).
PREFIX  ?= /opt/hived
BINDIR  ?= /usr/local/bin
CONFDIR ?= /etc/hived
UNITDIR ?= /etc/systemd/system
INSTALL_EXTRAS ?=

.PHONY: FORCE deps apt image test demo lint bench install uninstall clean

deps: apt $(VENV)/.installed $(VENV)/bin/promtool  ## Debian packages, the venv with the package

apt:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		echo "installing Debian packages: $(APT_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $(APT_PACKAGES) >/dev/null; \
	fi

# Remade when the project's metadata or native sources change, or when the venv was made
# from another interpreter than PYTHON (scripts/venv.sh then makes it anew).
BASE_PYTHON := $(shell readlink -f "$$(command -v $(PYTHON))")
ifneq ($(BASE_PYTHON),$(shell cat $(VENV)/.made-from 2>/dev/null))
VENV_STALE := FORCE
endif
$(VENV)/.installed: pyproject.toml setup.py $(wildcard _native/*.pyx _native/*_build.py) $(VENV_STALE) | apt
	scripts/venv.sh $(PYTHON) $(VENV) -e '.[test,plot]'
	touch $@

$(VENV)/bin/promtool: | apt $(VENV)/.installed
	scripts/promtool.sh $@

image: deps  ## the cell image (cached by content: a no-op when nothing changed)
	$(HIVED) image build

lint: deps
	$(VPY) -m ruff check .

test: image  ## lint, generated-file check, unit and real-microVM tests
	$(VPY) -m ruff check .
	$(VPY) protocol/generate.py --check
	$(VPY) -m pytest -ra $(PYTEST_ARGS)

demo: image  ## a whole hive on this machine running one build in a real microVM
	PYTHON=$(VPY) bash scripts/demo.sh

bench: image  ## the benchmarks, JSON on stdout
	$(HIVED) bench codec --json
	$(HIVED) bench boot --json

install: apt  ## hived into PREFIX (a venv), units and example configs into place; idempotent
	PYTHON=$(PYTHON) PREFIX=$(PREFIX) BINDIR=$(BINDIR) CONFDIR=$(CONFDIR) UNITDIR=$(UNITDIR) \
		EXTRAS=$(INSTALL_EXTRAS) scripts/install.sh install

uninstall:  ## removes what install put there (not CONFDIR/*.toml nor /var/lib/hived)
	PREFIX=$(PREFIX) BINDIR=$(BINDIR) CONFDIR=$(CONFDIR) UNITDIR=$(UNITDIR) \
		scripts/install.sh uninstall

FORCE:

clean:
	rm -rf build *.egg-info hived/*.so _native/*.c .pytest_cache .hypothesis
