# btrfs-deploy. `make demo` and `make test` install what they need first.
CACHE ?= $(CURDIR)/.cache
export PATH := $(HOME)/.cargo/bin:$(PATH):/usr/sbin:/sbin
DEPLOY = target/release/deploy
DEMO_IMG = $(CACHE)/demo.img

.PHONY: all build deps fixture demo test lint unit-test bench stress clean

all: build

deps:
	@scripts/install-deps.sh

fixture: deps
	@scripts/build-tiny-system.sh $(CACHE)

build: deps
	cargo build --release

demo: build fixture
	@rm -f $(DEMO_IMG)
	$(DEPLOY) --version factory --rootfs $(CACHE)/tiny/rootfs $(DEMO_IMG)
	$(DEPLOY) list $(DEMO_IMG)
	$(DEPLOY) boot-test $(DEMO_IMG) --timeout 120 --log $(CACHE)/demo-console.log
	@echo "--- what the booted system reported (/ and the /state mounts):"
	@grep -E "^TINY(-MOUNT)?: " $(CACHE)/demo-console.log | tr -d '\r'

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

test: deps fixture lint
	DEPLOY_TINY_ROOTFS=$(CACHE)/tiny/rootfs cargo test --release -- --test-threads=2

bench: build fixture
	scripts/bench.sh $(CACHE)

# The interruption sweep of tests/reliability.rs with many more kill points,
# and the power-cut replay of tests/powercut.rs over every recorded state.
stress: deps fixture
	DEPLOY_TINY_ROOTFS=$(CACHE)/tiny/rootfs scripts/stress.sh

clean:
	cargo clean
	rm -rf $(CACHE)
