# civicgate: build, test, demo, bench, deb.  `make test`, `make demo` and
# `make deb` install what they need (Debian packages) before building.

MODULE = build/ngx_http_civicgate_module.so

.PHONY: all build deps test unit prove test-asan fuzz demo bench bench-status \
        bench-keyspace bench-cluster deb clean test-debian12 test-debian13

all: build

build:
	sh scripts/deps.sh build
	sh scripts/build.sh

test:
	sh scripts/deps.sh test
	sh scripts/build.sh
	$(MAKE) unit
	$(MAKE) prove

unit:
	$(MAKE) -C lua-free-tests test

prove:
	prove -r $(PROVE_FLAGS) t/

# the suite against nginx and the module built with ASan and UBSan
# (build/asan/; docs/testing.md)
test-asan:
	sh scripts/deps.sh asan
	PROVE_FLAGS="$(PROVE_FLAGS)" sh scripts/asan.sh

# every fuzz target for FUZZ_SECONDS on its corpus (build/fuzz/;
# docs/testing.md)
FUZZ_SECONDS ?= 60

fuzz:
	sh scripts/deps.sh fuzz
	FUZZ_SECONDS=$(FUZZ_SECONDS) sh scripts/fuzz.sh run

demo:
	sh scripts/deps.sh demo
	sh scripts/build.sh
	sh scripts/demo.sh

bench:
	sh scripts/deps.sh bench
	sh scripts/build.sh
	sh bench/run.sh
	sh bench/status.sh

bench-status:
	sh scripts/deps.sh bench
	sh scripts/build.sh
	sh bench/status.sh

# Redis's cost per event as the keyspace grows (bench/keyspace.sh); fills
# Redis with about 1 000 000 journeys (some 5 GB today): KS_SIZES to change
bench-keyspace:
	sh scripts/deps.sh bench
	sh scripts/build.sh
	sh bench/run.sh keyspace

# the same scenarios against a 3-master Redis Cluster and one Redis
# (bench/cluster.sh)
bench-cluster:
	sh scripts/deps.sh bench
	sh scripts/build.sh
	sh bench/cluster.sh

# make test and make demo from a clone of HEAD in a fresh Debian 12 or 13
# root, as root (scripts/chroot-test.sh; docs/packaging.md)
test-debian12:
	bash scripts/chroot-test.sh bookworm

test-debian13:
	bash scripts/chroot-test.sh trixie

# build/deb/libnginx-mod-http-civicgate_*.deb (docs/packaging.md)
deb:
	sh scripts/deps.sh deb
	sh scripts/deb.sh

clean:
	rm -rf build
	$(MAKE) -C lua-free-tests clean
