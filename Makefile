# hived: `make demo` runs a build in a real microVM; `make test` runs every test.
# Both start from a fresh Debian 12 machine (as root): they install what is missing.

PYTHON ?= python3
HIVED  := $(PYTHON) -m hived
APT_PACKAGES := qemu-system-x86 postgresql debootstrap erofs-utils busybox-static e2fsprogs cpio \
	iproute2 crun wireguard-go wireguard-tools zstd xz-utils \
	docker-registry apache2-utils openssl
PYTEST_ARGS ?=

.PHONY: deps image test demo lint bench clean

deps:  ## Debian packages and the Python package (with its native modules)
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		echo "installing Debian packages: $(APT_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $(APT_PACKAGES) >/dev/null; \
	fi
	$(PYTHON) -m pip install -q --disable-pip-version-check -e '.[test]'

image: deps  ## the cell image (cached by content: a no-op when nothing changed)
	$(HIVED) image build

lint: deps
	$(PYTHON) -m ruff check .

test: image  ## lint, generated-file check, unit and real-microVM tests
	$(PYTHON) -m ruff check .
	$(PYTHON) protocol/generate.py --check
	$(PYTHON) -m pytest -ra $(PYTEST_ARGS)

demo: image  ## a whole hive on this machine running one build in a real microVM
	bash scripts/demo.sh

bench: image  ## the benchmarks, JSON on stdout
	$(HIVED) bench codec --json
	$(HIVED) bench boot --json

clean:
	rm -rf build *.egg-info hived/*.so _native/*.c .pytest_cache .hypothesis
