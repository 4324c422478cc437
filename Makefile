# diskwatch: the two commands a newcomer needs are `make demo` and `make test`.
# Both install what is missing (Debian packages, a virtualenv) first.

VENV      ?= .venv
PY        := $(VENV)/bin/python
# Debian's interpreter: it is the one that imports guestfs and nbd.
SYSPY     ?= /usr/bin/python3
APT_PKGS  := python3 python3-venv python3-dev python3-guestfs python3-libnbd python3-pycurl \
             libguestfs-tools qemu-utils qemu-system-x86 qemu-system-common nbdkit nbd-server libnbd-bin fio \
             fdisk mtools dosfstools e2fsprogs xz-utils busybox-static linux-image-amd64 \
             nginx-light openssh-server openssh-client tmux librsvg2-bin gnutls-bin systemd prometheus \
             ntfs-3g xfsprogs genisoimage exfatprogs libvirt-daemon-system libvirt-clients
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP     := $(VENV)/.installed

.PHONY: setup test test-fast fuzz demo bench lint clean

setup: $(STAMP)

# apt-get is only called when a package is missing, so a set-up machine pays nothing.
$(STAMP): pyproject.toml Makefile
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi
	[ -x $(PY) ] || $(SYSPY) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: setup
	$(VENV)/bin/pytest -v

test-fast: setup
	$(VENV)/bin/pytest -m 'not slow'

# A longer fuzz run than CI's share: more hypothesis examples against the
# protocol machine, more malformed sessions against the real server, more
# mutated filesystems walked by the mapper process.
FUZZ_EXAMPLES ?= 20000
FUZZ_SESSIONS ?= 20000
FUZZ_MAPPER ?= 300
fuzz: setup
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_SESSIONS=$(FUZZ_SESSIONS) FUZZ_MAPPER=$(FUZZ_MAPPER) \
		$(VENV)/bin/pytest -v -s tests/test_fuzz_protocol.py tests/test_fuzz_server.py \
		tests/test_mapper_fuzz.py

demo: setup
	$(VENV)/bin/diskwatch demo

bench: setup
	$(PY) benchmarks/bench_server.py
	$(PY) benchmarks/bench_ui.py
	$(PY) benchmarks/bench_metrics.py
	$(PY) benchmarks/bench_sources.py
	$(PY) benchmarks/bench_bmap_lookup.py
	$(PY) benchmarks/bench_tls.py
	$(PY) benchmarks/bench_bmap_metadata.py
	$(PY) benchmarks/bench_remap.py
	$(PY) benchmarks/bench_hostile.py

lint: setup
	$(VENV)/bin/ruff check diskwatch tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
