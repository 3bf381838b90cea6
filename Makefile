# btrfs-deploy. `make demo` and `make test` install what they need first.
CACHE ?= $(CURDIR)/.cache
export PATH := $(HOME)/.cargo/bin:$(PATH):/usr/sbin:/sbin
DEPLOY = target/release/deploy
# The arm64 build (issue 22), cross-compiled on this host: `-e on-device`
# carries it onto arm64 trees.
ARM64_TARGET = aarch64-unknown-linux-gnu
DEPLOY_ARM64 = target/$(ARM64_TARGET)/release/deploy
DEMO_IMG = $(CACHE)/demo.img

# Where `make install` puts things (DESTDIR is prepended to each).
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
DATADIR ?= $(PREFIX)/share
MANDIR ?= $(DATADIR)/man
DOCDIR ?= $(DATADIR)/doc/btrfs-deploy
# The binary finds its extensions at <bindir>/../share/btrfs-deploy/extensions,
# and -e on-device the arm64 build at <bindir>/../lib/btrfs-deploy/arm64/deploy.
EXTDIR = $(BINDIR)/../share/btrfs-deploy/extensions
ARM64DIR = $(BINDIR)/../lib/btrfs-deploy/arm64
BASHCOMPDIR ?= $(DATADIR)/bash-completion/completions
ZSHCOMPDIR ?= $(DATADIR)/zsh/site-functions
FISHCOMPDIR ?= $(DATADIR)/fish/vendor_completions.d
DEB_ROOT = target/deb-root

.PHONY: all build build-arm64 deps fixture demo test lint unit-test bench stress clean \
	install install-built uninstall deb deb-chroot deb-test ansible-sanity

all: build

deps:
	@scripts/install-deps.sh build

# The tiny test systems (amd64, arm64), the Raspberry Pi firmware and U-Boot
# (tests/rpi.rs), and the Debian 12 system with systemd of
# tests/trial_debian.rs.
fixture:
	@scripts/build-tiny-system.sh $(CACHE)
	@scripts/build-tiny-system.sh $(CACHE) arm64
	@scripts/fetch-rpi-firmware.sh $(CACHE)
	@scripts/build-debian-system.sh $(CACHE)

build: deps
	cargo build --release
	@$(MAKE) --no-print-directory build-arm64

# The linker is in .cargo/config.toml (Debian's gcc-aarch64-linux-gnu, static
# glibc); libbtrfsutil comes from libbtrfsutil-dev:arm64 (multiarch), found
# by pkg-config and read by bindgen for aarch64.
build-arm64:
	@scripts/install-deps.sh cross
	PKG_CONFIG_ALLOW_CROSS=1 PKG_CONFIG_ALL_STATIC=1 PKG_CONFIG_PATH= \
	  PKG_CONFIG_LIBDIR=/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig \
	  CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
	  BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu="--target=aarch64-linux-gnu -idirafter /usr/include" \
	  cargo build --release --target $(ARM64_TARGET)

# Build, then install the binary, the shipped extensions, man pages for
# deploy and every subcommand, bash/zsh/fish completions and the docs.
install: build
	@$(MAKE) --no-print-directory install-built

# Install $(DEPLOY) as it is (no build step; the install test uses this).
install-built:
	install -D -m 755 $(DEPLOY) $(DESTDIR)$(BINDIR)/deploy
	if [ -f $(DEPLOY_ARM64) ]; then install -D -m 755 $(DEPLOY_ARM64) $(DESTDIR)$(ARM64DIR)/deploy; fi
	install -d $(DESTDIR)$(EXTDIR)
	for f in extensions/*; do \
	  if [ -x "$$f" ]; then m=755; else m=644; fi; \
	  install -m $$m "$$f" $(DESTDIR)$(EXTDIR)/; \
	done
	$(DEPLOY) generate-man $(DESTDIR)$(MANDIR)/man1
	chmod 644 $(DESTDIR)$(MANDIR)/man1/deploy*.1
	t=$$(mktemp -d) && $(DEPLOY) generate-completions $$t && \
	  install -D -m 644 $$t/deploy.bash $(DESTDIR)$(BASHCOMPDIR)/deploy && \
	  install -D -m 644 $$t/_deploy $(DESTDIR)$(ZSHCOMPDIR)/_deploy && \
	  install -D -m 644 $$t/deploy.fish $(DESTDIR)$(FISHCOMPDIR)/deploy.fish; \
	  r=$$?; rm -rf $$t; exit $$r
	install -D -m 644 README.md $(DESTDIR)$(DOCDIR)/README.md
	install -d $(DESTDIR)$(DOCDIR)/docs
	install -m 644 docs/*.md $(DESTDIR)$(DOCDIR)/docs/

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/deploy
	rm -rf $(DESTDIR)$(EXTDIR) $(DESTDIR)$(DOCDIR) $(DESTDIR)$(ARM64DIR)
	-rmdir $(DESTDIR)$(BINDIR)/../share/btrfs-deploy 2>/dev/null
	-rmdir $(DESTDIR)$(BINDIR)/../lib/btrfs-deploy 2>/dev/null
	rm -f $(DESTDIR)$(MANDIR)/man1/deploy.1 $(DESTDIR)$(MANDIR)/man1/deploy-*.1
	rm -f $(DESTDIR)$(BASHCOMPDIR)/deploy $(DESTDIR)$(ZSHCOMPDIR)/_deploy \
	  $(DESTDIR)$(FISHCOMPDIR)/deploy.fish

# The Debian packages (cargo-deb), amd64 and arm64 (the cross build of
# build-arm64, with the same arch-independent files), from the files
# `make install` lays out under /usr, into target/debian/.
deb: build
	@scripts/install-deps.sh deb
	rm -rf $(DEB_ROOT)
	@$(MAKE) --no-print-directory install-built DESTDIR=$(CURDIR)/$(DEB_ROOT) PREFIX=/usr \
	  ZSHCOMPDIR=/usr/share/zsh/vendor-completions
	gzip -9n $(DEB_ROOT)/usr/share/man/man1/*.1
	rm -f target/debian/btrfs-deploy_*.deb
	cargo deb --no-build
	cargo deb --no-build --target $(ARM64_TARGET) --output target/debian/

# A clean Debian 12 chroot (debootstrap), kept in $(CACHE)/debian12.
deb-chroot:
	@scripts/install-deps.sh deb
	@scripts/build-deb-chroot.sh $(CACHE)

# Installs the package into a copy of that chroot and deploys from inside it.
deb-test: deb deb-chroot fixture
	DEPLOY_TINY_ROOTFS=$(CACHE)/tiny/rootfs DEPLOY_DEB_CHROOT=$(CACHE)/debian12 \
	  cargo test --release --test package -- --test-threads=1

demo: build fixture
	@scripts/install-deps.sh demo
	@rm -f $(DEMO_IMG)
	$(DEPLOY) --version factory --rootfs $(CACHE)/tiny/rootfs $(DEMO_IMG)
	$(DEPLOY) list $(DEMO_IMG)
	$(DEPLOY) boot-test $(DEMO_IMG) --firmware uefi --timeout 120 --log $(CACHE)/demo-console-uefi.log
	$(DEPLOY) boot-test $(DEMO_IMG) --firmware bios --timeout 120 --log $(CACHE)/demo-console.log
	@echo "--- what the booted system reported under UEFI (/ and the /state mounts):"
	@grep -E "^TINY(-MOUNT)?: " $(CACHE)/demo-console-uefi.log | tr -d '\r'
	@echo "--- and under BIOS:"
	@grep -E "^TINY(-MOUNT)?: " $(CACHE)/demo-console.log | tr -d '\r'

lint: deps
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

test: fixture lint deb deb-chroot
	@scripts/install-deps.sh test
	DEPLOY_TINY_ROOTFS=$(CACHE)/tiny/rootfs DEPLOY_DEB_CHROOT=$(CACHE)/debian12 \
	  DEPLOY_TINY_ARM64_ROOTFS=$(CACHE)/tiny-arm64/rootfs DEPLOY_ON_DEVICE_CACHE=$(CACHE)/on-device \
	  DEPLOY_DEBIAN_ROOTFS=$(CACHE)/debian12-systemd/rootfs \
	  cargo test --release -- --test-threads=2
	ansible/tests/sanity.sh

# ansible-test sanity (offline tests), pycodestyle, yamllint and ansible-doc
# on the Ansible collection in ansible/.
ansible-sanity:
	@scripts/install-deps.sh test
	ansible/tests/sanity.sh

bench: build fixture
	@scripts/install-deps.sh demo
	scripts/bench.sh $(CACHE)

# The interruption sweep of tests/reliability.rs with many more kill points,
# and the power-cut replay of tests/powercut.rs over every recorded state.
stress: fixture
	@scripts/install-deps.sh test
	DEPLOY_TINY_ROOTFS=$(CACHE)/tiny/rootfs scripts/stress.sh

clean:
	cargo clean
	rm -rf $(CACHE)
