#!/usr/bin/env bash
# Builds the Brig guest initramfs: the static brig-agent as /init, plus /dev/console and
# /dev/null and the empty mount points the agent uses. Prints the output path on stdout.
#
#   rootfs/build.sh            -> <target dir>/brig/initramfs.cpio.gz
#
# Needs root (mknod), cargo with the x86_64-unknown-linux-musl target, cpio, gzip, readelf.
# Reproducible: sorted entries, owner 0:0, mtimes = $SOURCE_DATE_EPOCH (default 0),
# renumbered inodes (cpio --reproducible), gzip without name/time.
set -euo pipefail

die() { echo "rootfs/build.sh: $*" >&2; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
[[ $target_dir = /* ]] || target_dir=$repo/$target_dir
triple=x86_64-unknown-linux-musl
agent=$target_dir/$triple/guest/brig-agent
out_dir=$target_dir/brig
out=$out_dir/initramfs.cpio.gz
epoch=${SOURCE_DATE_EPOCH:-0}

for tool in cargo cpio gzip readelf mknod; do
    command -v "$tool" >/dev/null || die "'$tool' is not installed"
done
[[ $(id -u) -eq 0 ]] || die "must run as root: /dev/console and /dev/null are created with mknod"

# 1. The agent, static musl, built for size (the `guest` profile: each guest holds all of it
#    in memory). Progress on stderr; stdout carries only the result.
(cd "$repo" && cargo build --profile guest --locked --target "$triple" -p brig-agent) >&2 \
    || die "building brig-agent for $triple failed (is the target installed? rustup target add $triple)"
[[ -x $agent ]] || die "expected the agent at $agent"

# 2. It must be fully static: no program interpreter, no shared libraries.
if readelf -lW "$agent" | grep -q 'INTERP'; then
    die "$agent has a program interpreter (dynamically linked); the guest has no libc"
fi
if readelf -dW "$agent" | grep -q '(NEEDED)'; then
    die "$agent needs shared libraries: $(readelf -dW "$agent" | grep '(NEEDED)' | tr -s ' ' | tr '\n' ';')"
fi

# 3. The tree.
mkdir -p "$out_dir"
stage=$(mktemp -d "$out_dir/initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
cd "$stage"
install -m 0755 "$agent" init
mkdir -p dev proc sys sys/fs/cgroup run tmp
chmod 0755 dev proc sys sys/fs sys/fs/cgroup run
chmod 1777 tmp
mknod -m 0600 dev/console c 5 1 || die "mknod /dev/console failed (need root, and a filesystem that allows device nodes)"
mknod -m 0666 dev/null c 1 3 || die "mknod /dev/null failed"
find . -exec touch -h -d "@$epoch" {} +

# 4. The archive.
reproducible=
cpio --help 2>&1 | grep -q -- '--reproducible' && reproducible=--reproducible
find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort \
    | cpio --quiet -o -H newc -R 0:0 $reproducible \
    | gzip -n -9 > "$out.tmp"
mv -f "$out.tmp" "$out"
echo "$out"
