# Brig: the two commands a fresh Debian machine needs are `make run` and `make test`.
# Each installs what it needs (Debian packages, the musl target, the guest kernel build,
# cached in ~/.cache/brig) and then does its job. On a host whose /dev/kvm cannot boot a
# stock kernel (PVM, or no KVM) guests boot inside the nested-KVM lab (tests/lab/run.sh).

SHELL := /bin/bash
MUSL := x86_64-unknown-linux-musl
STAGE := $(CURDIR)/target/brig
BIN := $(STAGE)/bin
SHARE := $(STAGE)/share/brig
export BRIG_CACHE ?= $(HOME)/.cache/brig
# Where the tests and `make run` find Brig's pieces.
export BRIG_VMM := $(BIN)/brig-vmm
export BRIG_BIN := $(BIN)/brig
export BRIG_SHIM := $(BIN)/containerd-shim-brig-v2
export BRIG_KERNEL := $(SHARE)/vmlinux
export BRIG_INITRD := $(SHARE)/initramfs.cpio.gz
# A hostile test guest (a freestanding PVH kernel) for the e2e tests: tests/stress-guest.
export BRIG_STRESS_GUEST := $(STAGE)/test/brig-stress-guest

# (protobuf-compiler: the e2e CRI client compiles the CRI api.proto that k8s-cri ships)
# (netavark aardvark-dns: podman's own networks and their name lookups, which podman.rs tests;
# podman's packages only recommend them)
# (docker-registry skopeo umoci: the image tests' registry, and the tools that build and push
# their images: tests/e2e/src/registry.rs)
DEB_PACKAGES := linux-source-6.1 build-essential patch flex bison bc libelf-dev libssl-dev cpio \
	busybox-static qemu-system-x86 kmod xz-utils musl-tools python3 iproute2 runc containerd \
	protobuf-compiler containernetworking-plugins iptables iperf3 podman netavark aardvark-dns \
	docker-registry skopeo umoci

# virtiofsd, the peer of `brig-bench fs`, from crates.io into a cached prefix (benchmarks only).
VIRTIOFSD_ROOT := $(BRIG_CACHE)/virtiofsd
VIRTIOFSD := $(VIRTIOFSD_ROOT)/bin/virtiofsd
BENCH_DEB_PACKAGES := libseccomp-dev libcap-ng-dev pkg-config
# (a variable: a comma written inside $(call …) would split its argument)
BENCH_FS_MODES := metadata,auto

# Run a command where guests can boot: directly with hardware KVM, else in the lab.
IN_GUEST_HOST = if tests/lab/run.sh --check >/dev/null 2>&1; then tests/lab/run.sh -- $(1); else $(1); fi

PREFIX ?= /usr/local

.PHONY: install all setup deps rust-targets kernel initramfs binaries rootfs-fixture stress-guest stage run test lint fuzz-tools fuzz-smoke fuzz unit-test e2e-test bench-boot bench-run bench-pods bench-images bench-podman bench-net bench-deps bench-fs clean-stage

all: stage

setup: deps rust-targets

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

rust-targets:
	@rustup target list --installed | grep -qx $(MUSL) || rustup target add $(MUSL)

kernel: deps
	@mkdir -p $(SHARE)
	@vmlinux=$$(guest-kernel/build.sh) && ln -sf "$$vmlinux" $(SHARE)/vmlinux

initramfs: setup
	@mkdir -p $(SHARE)
	@initrd=$$(rootfs/build.sh) && cp "$$initrd" $(SHARE)/initramfs.cpio.gz

# Static binaries: they start fast inside the lab (no dynamic loading over 9p).
binaries: setup
	cargo build --release --locked --target $(MUSL) -p brig-vmm -p brig-cli -p brig-shim
	@mkdir -p $(BIN)
	cp target/$(MUSL)/release/brig-vmm target/$(MUSL)/release/brig target/$(MUSL)/release/containerd-shim-brig-v2 $(BIN)/

# The hostile test guest: freestanding, so built alone with its own link script.
stress-guest: setup
	cd tests/stress-guest && cargo build --release --locked
	@mkdir -p $(dir $(BRIG_STRESS_GUEST))
	cp tests/stress-guest/target/$(MUSL)/release/brig-stress-guest $(BRIG_STRESS_GUEST)

# A small root filesystem (static busybox) for `make run` and manual tries; no registry needed.
rootfs-fixture: deps
	@tests/fixtures/busybox-rootfs.sh $(STAGE)/busybox-rootfs

stage: kernel initramfs binaries rootfs-fixture

# Boot a microVM, show its agent answering over vsock, then run a container in a microVM.
run: stage
	@$(call IN_GUEST_HOST,$(CURDIR)/scripts/demo.sh)

test: lint unit-test fuzz-smoke e2e-test

# Every parser of guest bytes has a fuzz target (cargo-fuzz, nightly): DIR:TARGET, each with a
# committed seed corpus in DIR/fuzz/corpus/TARGET. `make test` runs each for FUZZ_SECONDS
# (new inputs go to a scratch directory, not into the tree); `make fuzz` for 10 minutes. An
# input that takes over 30 s is a failure (a hang), not a wait for libFuzzer's 20 minutes.
FUZZ_TARGETS := vmm:vsock_connect_line vmm:vsock_tx_packet vmm:vsock_backend vmm:mmio_registers vmm:net_chains vmm:balloon_reports vmm:fs_requests runtime:vsock_ack runtime:agent_replies agent:oci_config
FUZZ_SECONDS ?= 10

fuzz-tools: setup
	@cargo +nightly --version >/dev/null 2>&1 || rustup toolchain install nightly --profile minimal
	@command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz

fuzz-smoke: fuzz-tools
	@set -e; for t in $(FUZZ_TARGETS); do dir=$${t%%:*}; name=$${t#*:}; \
		scratch=$$(mktemp -d); log=$$scratch.log; \
		echo "fuzz: $$dir $$name for $(FUZZ_SECONDS) s"; \
		if (cd $$dir/fuzz && cargo +nightly fuzz run $$name $$scratch corpus/$$name -- \
			-max_total_time=$(FUZZ_SECONDS) -timeout=30 -print_final_stats=1) > $$log 2>&1; then \
			grep -E '^stat::number_of_executed_units' $$log || true; rm -rf $$scratch $$log; \
		else \
			tail -n 40 $$log; rm -rf $$scratch $$log; \
			echo "fuzz: $$name FAILED (the input is in $$dir/fuzz/artifacts/$$name)"; exit 1; \
		fi; \
	done

fuzz:
	$(MAKE) fuzz-smoke FUZZ_SECONDS=600

# The workspace lints mean something only if they run: clippy with warnings as errors, and
# rustfmt's layout.
lint: setup
	@cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1 || rustup component add rustfmt clippy
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

unit-test: setup
	cargo test --locked --workspace --exclude brig-e2e

# End-to-end tests: the real binaries booting real guests. Each test has 450 s
# (tests/e2e/run-all.sh); where guests need the lab, two L1s (one per core) share the suite
# (tests/e2e/run-in-labs.sh), each with 30 min.
e2e-test: stage stress-guest
	@exes=$$(cargo test --release --locked --target $(MUSL) -p brig-e2e --no-run --message-format=json 2>/dev/null \
		| python3 -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]]'); \
	test -n "$$exes" || { echo "e2e test binaries did not build"; cargo test --release --locked --target $(MUSL) -p brig-e2e --no-run; exit 1; }; \
	export BRIG_LAB_TIMEOUT=$${BRIG_LAB_TIMEOUT:-2400} BRIG_LAB_FREEZE_RETRIES=$${BRIG_LAB_FREEZE_RETRIES:-1}; tests/e2e/run-in-labs.sh $$exes

# Boot time and VMM memory against QEMU microvm, in one lab boot; the report is committed.
bench-boot: stage
	cargo build --release --locked --target $(MUSL) -p brig-bench
	cp target/$(MUSL)/release/brig-bench $(BIN)/
	@mkdir -p bench/reports
	@set -o pipefail; $(call IN_GUEST_HOST,$(BIN)/brig-bench boot --runs 10) | grep -v '^bench: ' | tee bench/reports/boot.md.new
	@mv bench/reports/boot.md.new bench/reports/boot.md

# A container run against runc, and sandbox memory, in one lab boot (after bench-fs); the report is committed.
bench-run: stage bench-fs
	cargo build --release --locked --target $(MUSL) -p brig-bench
	cp target/$(MUSL)/release/brig-bench $(BIN)/
	@mkdir -p bench/reports
	@set -o pipefail; $(call IN_GUEST_HOST,$(BIN)/brig-bench run --runs 10 --rootfs $(STAGE)/busybox-rootfs) | tee bench/reports/run.md.new
	@mv bench/reports/run.md.new bench/reports/run.md

# Run the #[ignore]d end-to-end benchmark test $(1) where guests boot; its `report: ` lines
# become bench/reports/$(2).md (the whole output stays in $(2).log if it printed none).
define E2E_BENCH
	@exe=$$(cargo test --release --locked --target $(MUSL) -p brig-e2e --test $(1) --no-run --message-format=json 2>/dev/null \
		| python3 -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]]'); \
	test -n "$$exe" || { echo "the benchmark $(1) did not build"; exit 1; }; \
	mkdir -p bench/reports; set -o pipefail; \
	$(call IN_GUEST_HOST,$$exe --ignored --exact $(1) --nocapture --test-threads=1) | tee bench/reports/$(2).log \
		| sed -n 's/^report: //p' > bench/reports/$(2).md.new
	@test -s bench/reports/$(2).md.new && mv bench/reports/$(2).md.new bench/reports/$(2).md && rm -f bench/reports/$(2).log && cat bench/reports/$(2).md
endef

# Pods through containerd's CRI, Brig against runc, in one lab boot; the report is committed.
bench-pods: stage
	$(call E2E_BENCH,bench_pods,pods)

# Pull and unpack of a multi-layer image, Brig against skopeo copy + umoci unpack, in one
# session (in the lab where guests need it, for the same conditions as the tests); the
# report is committed.
bench-images: stage
	$(call E2E_BENCH,bench_images,images)

# podman run with Brig against podman with runc, and Brig's microVM boot, in one lab boot;
# the report is committed.
bench-podman: stage
	$(call E2E_BENCH,bench_podman,podman)

# Pod networking, a Brig pod against a runc pod and a QEMU + vhost-net guest (brig-bench
# net-peer, with virtiofsd) on one CNI bridge (iperf3, wrk), in one lab boot; the report is
# committed.
bench-net: stage bench-deps
	@command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	@exe=$$(cargo test --release --locked --target $(MUSL) -p brig-e2e --test bench_net --no-run --message-format=json 2>/dev/null \
		| python3 -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]]'); \
	test -n "$$exe" || { echo "the network benchmark did not build"; exit 1; }; \
	cargo build --release --locked --target $(MUSL) -p brig-bench && cp target/$(MUSL)/release/brig-bench $(BIN)/ || exit 1; \
	export BRIG_BENCH=$(BIN)/brig-bench BRIG_BENCH_ROOTFS=$(STAGE)/busybox-rootfs BRIG_VIRTIOFSD=$(VIRTIOFSD); \
	mkdir -p bench/reports; set -o pipefail; \
	$(call IN_GUEST_HOST,$$exe --ignored --exact bench_net --nocapture --test-threads=1) | tee bench/reports/net.log \
		| sed -n 's/^report: //p' > bench/reports/net.md.new
	@test -s bench/reports/net.md.new && mv bench/reports/net.md.new bench/reports/net.md && rm -f bench/reports/net.log && cat bench/reports/net.md

# virtiofsd's build needs libseccomp and libcap-ng; it is installed once, outside the tree.
bench-deps: deps
	@missing=$$(for p in $(BENCH_DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@test -x $(VIRTIOFSD) || cargo install --locked virtiofsd --root $(VIRTIOFSD_ROOT)

# virtio-fs of brig-vmm against QEMU + virtiofsd, per cache mode, and L1 itself, in one lab
# boot (~20 min): three rounds of the two modes that matter (metadata is the fastest for both
# servers here, auto is the default); `brig-bench fs --modes never,always` measures the rest.
bench-fs: stage bench-deps
	cargo build --release --locked --target $(MUSL) -p brig-bench
	cp target/$(MUSL)/release/brig-bench target/$(MUSL)/release/brig-fsbench $(BIN)/
	@mkdir -p bench/reports
	@set -o pipefail; export BRIG_LAB_TIMEOUT=$${BRIG_LAB_TIMEOUT:-2700}; \
	$(call IN_GUEST_HOST,$(BIN)/brig-bench fs --runs 3 --modes $(BENCH_FS_MODES) --rootfs $(STAGE)/busybox-rootfs --virtiofsd $(VIRTIOFSD)) | grep -v '^bench: ' | tee bench/reports/fs.md.new
	@mv bench/reports/fs.md.new bench/reports/fs.md

# Brig's binaries into $(PREFIX)/bin (containerd finds containerd-shim-brig-v2 on its PATH),
# the guest kernel and initramfs into $(PREFIX)/share/brig, and a commented default
# /etc/brig/brig.toml unless one exists. See configs/ for containerd and Kubernetes.
install: stage
	install -D -m 755 -t $(DESTDIR)$(PREFIX)/bin $(BIN)/brig $(BIN)/brig-vmm $(BIN)/containerd-shim-brig-v2
	install -D -m 644 -t $(DESTDIR)$(PREFIX)/share/brig $(SHARE)/vmlinux $(SHARE)/initramfs.cpio.gz
	@test -e $(DESTDIR)/etc/brig/brig.toml || install -D -m 644 configs/brig.toml $(DESTDIR)/etc/brig/brig.toml

clean-stage:
	rm -rf $(STAGE)
