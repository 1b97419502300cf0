#!/bin/bash
# tests/lab/selftest.sh - checks that the lab (tests/lab/run.sh) works on this host:
# exit status and stderr travel back, argv quoting survives, no CR is added, and a guest
# (L2) boots with KVM inside L1 with 2 vCPUs. Takes ~30 s plus the first-run cache build.
#
# Usage: tests/lab/selftest.sh [VMLINUX]   (default: newest ~/.cache/brig/kernel-*/vmlinux;
#                                           the L2 part is skipped if there is none)
# Inside the lab it calls itself as `selftest.sh --l2 VMLINUX`.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [ "${1:-}" = --l2 ]; then
  # In L1: a busybox initramfs in /tmp whose /init prints nproc and reboots (reboot=t: a triple
  # fault, which -no-reboot turns into QEMU exiting; microvm has no keyboard controller for =k).
  r=/tmp/l2root
  mkdir -p "$r/bin" "$r/proc"
  cp /bin/busybox "$r/bin/"
  # shellcheck disable=SC2016 # expands in L2, not here
  printf '%s\n' '#!/bin/busybox sh' '/bin/busybox mount -t proc p /proc' \
    'echo "L2 nproc=$(/bin/busybox nproc) uptime=$(/bin/busybox cut -d" " -f1 /proc/uptime)"' \
    '/bin/busybox reboot -f' > "$r/init"
  chmod 755 "$r/init"
  (cd "$r" && find . | cpio -o -H newc --quiet | gzip -1) > /tmp/l2.cpio.gz
  t0=${EPOCHREALTIME/./}
  out=$(timeout 120 qemu-system-x86_64 -M microvm,accel=kvm,acpi=off -cpu host -m 256 -smp 2 \
    -nodefaults -no-user-config -nographic -serial stdio -no-reboot \
    -kernel "$2" -initrd /tmp/l2.cpio.gz -append 'console=ttyS0 reboot=t panic=-1 quiet' 2>/dev/null | tr -d '\r')
  echo "$out" | grep '^L2 '
  echo "L2 qemu wall: $(( (${EPOCHREALTIME/./} - t0) / 1000 )) ms (L1 clock)"
  echo "$out" | grep -q '^L2 nproc=2 '
  exit
fi

fail() { echo "selftest: FAIL: $*" >&2; exit 1; }
lab=$HERE/run.sh

rc=0
out=$("$lab" -- sh -c 'ls /dev/kvm /dev/vhost-vsock /dev/net/tun; grep -cw svm /proc/cpuinfo; echo out; echo err >&2; exit 7') || rc=$?
[ "$rc" = 7 ] || fail "exit status $rc, wanted 7"
[ "$out" = $'/dev/kvm\n/dev/net/tun\n/dev/vhost-vsock\n1\nout\nerr' ] || fail "output: $(printf %q "$out")"
echo "selftest: devices, exit status, stderr: ok"

# shellcheck disable=SC2016 # a literal $HOME must arrive unexpanded
out=$("$lab" -- printf '%s|' "a b" 'c"d' '' $'e\nf' "g'h" '$HOME')
[ "$out" = $'a b|c"d||e\nf|g\'h|$HOME|' ] || fail "quoting: $(printf %q "$out")"
echo "selftest: quoting: ok"

# shellcheck disable=SC2012 # our own cache dir names: plain hex
k=${1:-$(ls -t "${BRIG_CACHE:-$HOME/.cache/brig}"/kernel-*/vmlinux 2>/dev/null | head -n 1)}
if [ -z "$k" ] || [ ! -f "$k" ]; then echo "selftest: no guest vmlinux; L2 boot skipped"; exit 0; fi
"$lab" -- "$HERE/selftest.sh" --l2 "$k" || fail "L2 boot with KVM in L1"
echo "selftest: L2 boot with KVM: ok"
