#!/usr/bin/env bash
# Build Brig's guest kernel (an uncompressed vmlinux with a PVH entry note) from Debian's
# linux-source-6.1 package and brig.fragment, everything built in, no modules.
#
# The result is cached outside the work tree, keyed by a hash of its inputs (the source
# package version, the fragment and this script), so a rebuild happens only when one changes.
# Prints the path of the vmlinux on stdout; progress goes to stderr.
#
# Env: BRIG_CACHE (default ~/.cache/brig), JOBS (default nproc).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${BRIG_CACHE:-$HOME/.cache/brig}
jobs=${JOBS:-$(nproc)}
tarball=/usr/src/linux-source-6.1.tar.xz
[ -f "$tarball" ] || { echo "guest-kernel: $tarball missing; install it with: apt-get install linux-source-6.1" >&2; exit 1; }

pkgver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { echo "$pkgver"; cat "$here/brig.fragment" "$here/build.sh" "$here"/*.patch; } | sha256sum | cut -c1-16)
out=$cache/kernel-$key
if [ -f "$out/vmlinux" ]; then echo "$out/vmlinux"; exit 0; fi

work=$cache/kernel-build-$key
rm -rf "$work"; mkdir -p "$work"
echo "guest-kernel: unpacking linux-source $pkgver into $work" >&2
tar xf "$tarball" -C "$work"
src=$work/linux-source-6.1
# Free page reporting at a finer grain than 2 MiB blocks, when the command line asks for it
# (page_reporting.page_reporting_order=N): 6.1 overwrites that parameter with the balloon
# driver's order when the balloon registers; later kernels keep it (as here, backported).
reporting=$src/mm/page_reporting.c
grep -q 'page_reporting_order = prdev->order ? : pageblock_order;' "$reporting" \
  || { echo "guest-kernel: $reporting changed: update the page_reporting_order patch" >&2; exit 1; }
sed -i 's/^unsigned int page_reporting_order = MAX_ORDER;/unsigned int page_reporting_order = -1;/; s/\tpage_reporting_order = prdev->order ? : pageblock_order;/\tif (page_reporting_order == -1)\n\t\tpage_reporting_order = prdev->order ? : pageblock_order;/' "$reporting"
grep -q '^unsigned int page_reporting_order = -1;' "$reporting" \
  || { echo "guest-kernel: the page_reporting_order patch did not apply" >&2; exit 1; }
# Brig's own patches (each says why in its comments).
for p in "$here"/*.patch; do
  patch -d "$src" -p1 --forward --quiet < "$p" \
    || { echo "guest-kernel: $p did not apply to linux-source $pkgver" >&2; exit 1; }
done
make -C "$src" ARCH=x86_64 KCONFIG_ALLCONFIG="$here/brig.fragment" allnoconfig >"$work/config.log" 2>&1 \
  || { tail -20 "$work/config.log" >&2; exit 1; }

# Every option the fragment asks for must have landed: a silently dropped option is a
# missing feature in every guest.
missing=0
while read -r line; do
  grep -qx "$line" "$src/.config" || { echo "guest-kernel: $line did not apply (dependency missing?)" >&2; missing=1; }
done < <(grep '^CONFIG_' "$here/brig.fragment")
[ "$missing" = 0 ] || exit 1

echo "guest-kernel: make -j$jobs vmlinux (a few minutes)" >&2
make -C "$src" ARCH=x86_64 -j"$jobs" vmlinux >"$work/build.log" 2>&1 || { tail -30 "$work/build.log" >&2; exit 1; }
mkdir -p "$out.tmp"
cp "$src/vmlinux" "$src/.config" "$out.tmp/"
rm -rf "$out"; mv "$out.tmp" "$out"
rm -rf "$work"
echo "$out/vmlinux"
