#!/bin/bash
# tests/lab/run.sh - run one command inside "the lab": a TCG QEMU VM (L1) that has a real,
# nested /dev/kvm, for hosts whose own /dev/kvm cannot boot a stock guest kernel (PVM).
# See /work/shared/LAB.md for why the lab exists.
#
# Usage:
#   tests/lab/run.sh -- CMD [ARGS...]   boot L1, run CMD as root in it, power off; exit with CMD's status
#   tests/lab/run.sh --check            exit 0 (and say why) if this host NEEDS the lab, i.e.
#                                       /sys/module/kvm_pvm exists, /dev/kvm is missing, or neither
#                                       kvm_intel nor kvm_amd is loaded; exit 1 if hardware KVM is
#                                       usable directly (then run tests without the lab)
#   tests/lab/run.sh --prepare          only build/fetch the cached L1 kernel + initramfs
#   tests/lab/selftest.sh               checks the lab end to end (incl. an L2 boot with KVM)
#
# Inside L1:
#   - the host's / is shared read-only over virtio-9p, with a tmpfs overlay on top (writes stay in
#     L1 RAM and vanish at power-off); host paths are the same inside (work tree, target/, caches);
#     9p runs with cache=loose: files the host changes while L1 runs may look stale inside;
#     /proc /sys /dev /dev/pts /dev/shm are fresh, /run and /tmp are empty tmpfs (so a $PWD under
#     the host's /tmp is NOT visible), cgroup2 is at /sys/fs/cgroup, lo is up;
#   - /dev/kvm (kvm-amd), /dev/vhost-vsock and /dev/net/tun exist; other modules of L1's kernel
#     load on demand (modprobe works: the kernel's module tree is bind-mounted from the cache);
#   - CMD runs in the caller's $PWD with stdin=/dev/null, env = PATH, HOME=/root, TERM=dumb,
#     LANG=C.UTF-8, plus BRIG_*, RUST_LOG, RUST_BACKTRACE, CARGO_HOME, RUSTUP_HOME and any names
#     listed in BRIG_LAB_ENV (space separated) that are set on the host.
#   - CMD's stdout+stderr (merged) arrive on this script's stdout byte for byte, as they are
#     written (a virtio-serial port, no tty, so no CR is added); L1's kernel console goes to a log.
#
# Environment:
#   BRIG_LAB_MEM=4096           L1 memory, MiB (TCG allocates lazily, so generous costs little)
#   BRIG_LAB_TIMEOUT=3000       seconds for the whole run; then exit 124
#   BRIG_LAB_BOOT_TIMEOUT=300   seconds for L1 to reach CMD; a boot that fails is retried
#   BRIG_LAB_BOOT_RETRIES=1     ... this many times (CMD has not started, so a retry is safe)
#   BRIG_LAB_FREEZE_TIMEOUT=180 seconds without L1's heartbeat (written every 10 s while CMD runs)
#                               after which L1 counts as frozen: its registers are shown, exit 125
#                               (after 30 s without one, L1 gets a byte on its serial port: see
#                               the watchdog in boot_once)
#   BRIG_LAB_FREEZE_RETRIES=0   run CMD again in a fresh L1 this many times when L1 froze (only
#                               for commands that can simply be repeated, like a test suite)
#   BRIG_LAB_CONSOLE_LOG=FILE   copy L1's console log there at exit (default: tail on failure)
#   BRIG_LAB_SHARE=DIR          a host directory L1 sees writable, uncached, at the same path
#                               (over the read-only root): what several labs running at once
#                               share, such as tests/e2e/run-all.sh's work queue
#   BRIG_CACHE=~/.cache/brig    cache root; the lab lives in $BRIG_CACHE/lab-<hash>/, keyed by the
#                               Debian kernel package + version and this script's content;
#                               building a new one prunes older lab-* dirs no running lab uses
#
# Exit status: CMD's status; 124 on timeout; 125 if L1 did not come up / died without a result
# (the last 40 lines of L1's console are printed to stderr); 141 if our stdout was closed;
# 2 on usage or setup errors.
#
# Needs: qemu-system-x86 (q35, TCG), busybox-static, kmod, cpio, apt-get download access to a
# Debian mirror for linux-image-6.1.0-*-amd64 (generic flavour: the cloud one has no 9p).
set -euo pipefail
shopt -s inherit_errexit

SELF=$(readlink -f "${BASH_SOURCE[0]}")
CACHE_ROOT=${BRIG_CACHE:-$HOME/.cache/brig}
LAB_MEM=${BRIG_LAB_MEM:-4096}
LAB_TIMEOUT=${BRIG_LAB_TIMEOUT:-3000}
BOOT_TIMEOUT=${BRIG_LAB_BOOT_TIMEOUT:-300}
BOOT_RETRIES=${BRIG_LAB_BOOT_RETRIES:-1}
FREEZE_TIMEOUT=${BRIG_LAB_FREEZE_TIMEOUT:-180}
FREEZE_RETRIES=${BRIG_LAB_FREEZE_RETRIES:-0}
BUSYBOX=/bin/busybox   # must be static: it runs in L1's initramfs and as L1's PID 1

# Modules L1 loads at boot, in dependency order (modprobe --show-depends adds anything missing).
# virtio_console is for the output port, virtio_rng keeps getrandom() from stalling under TCG.
L1_MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
 9pnet 9pnet_virtio netfs fscache 9p overlay virtio_console virtio_rng
 irqbypass kvm ccp kvm_amd vsock vhost_iotlb vhost vmw_vsock_virtio_transport_common vhost_vsock tun"

die() { echo "lab: $*" >&2; exit 2; }
say() { echo "lab: $*" >&2; }

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$SELF" >&2; exit 2; }

# ---------------------------------------------------------------------------------------------
# --check: does this host need the lab? 0 = yes (stock kernels cannot boot on its /dev/kvm).
needs_lab() {
  if [ -d /sys/module/kvm_pvm ]; then echo "needs lab: /dev/kvm is PVM (kvm_pvm loaded)"; return 0; fi
  if [ ! -c /dev/kvm ]; then echo "needs lab: no /dev/kvm"; return 0; fi
  if [ ! -d /sys/module/kvm_intel ] && [ ! -d /sys/module/kvm_amd ]; then
    echo "needs lab: neither kvm_intel nor kvm_amd is loaded"; return 0
  fi
  echo "no lab needed: hardware KVM (/dev/kvm with kvm_intel or kvm_amd)"
  return 1
}

# ---------------------------------------------------------------------------------------------
# Which Debian kernel: the one the linux-image-amd64 metapackage names, else the newest
# linux-image-6.1.0-N-amd64 that is installed or known to apt. Prints "PACKAGE VERSION".
# (apt-cache costs ~0.8 s a call here: the lists are kept gzipped and there is no pkgcache.)
pick_kernel_pkg() {
  local p v
  read -r p v < <(apt-cache show --no-all-versions linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" { for (i = 2; i <= NF; i++) if ($i ~ /^linux-image-6\.1\.0-[0-9]+-amd64$/) {
           v = ($(i+1) == "(=") ? $(i+2) : ""; sub(/\)?,?$/, "", v); print $i, v; exit } }') || true
  if [ -z "${p:-}" ]; then
    p=$( { dpkg-query -W -f '${Package}\n' 'linux-image-6.1.0-*-amd64' 2>/dev/null || true
           apt-cache pkgnames linux-image-6.1.0- 2>/dev/null || true; } |
         grep -E '^linux-image-6\.1\.0-[0-9]+-amd64$' | sort -V | tail -n 1) || true
  fi
  [ -n "${p:-}" ] || die "no linux-image-6.1.0-*-amd64 known to apt (run apt-get update?)"
  if [ -z "${v:-}" ]; then
    v=$(apt-cache show --no-all-versions "$p" 2>/dev/null | awk '$1 == "Version:" {print $2; exit}') || true
  fi
  [ -n "${v:-}" ] || die "apt knows no version of $p (run apt-get update?)"
  echo "$p $v"
}

# Sets DIR to the cache dir, building it if needed, and keeps a shared lock on it (fd 9) for
# as long as this script runs, so that pruning by a newer script version never removes it.
prepare_cache() {
  local pkg ver key
  read -r pkg ver < <(pick_kernel_pkg)
  [ -n "${ver:-}" ] || exit 2   # pick_kernel_pkg said why
  # The key covers everything the cached files are made from: kernel package and this script
  # (module list, init scripts). busybox is taken as is; delete the cache dir to rebuild.
  key=$( { echo "$pkg=$ver"; cat "$SELF"; } | sha256sum | cut -c1-16)
  DIR=$CACHE_ROOT/lab-$key
  mkdir -p "$CACHE_ROOT"
  exec 9>"$DIR.lock"
  if [ ! -e "$DIR/ready" ]; then
    # Concurrent first runs: one builds, the others wait here and then find it ready.
    flock -x 9
    if [ ! -e "$DIR/ready" ]; then
      build_cache "$pkg" "$ver" "$DIR" >&2
      prune_cache
    fi
  fi
  flock -s 9
  # An older version of this script may have pruned it between our check and our lock.
  [ -e "$DIR/ready" ] || die "lab cache $DIR vanished (pruned concurrently?); run again"
}

# Drop lab dirs of other script/kernel versions that no running lab holds (each run keeps a
# shared lock): ~470 MB each.
prune_cache() {
  local d
  for d in "$CACHE_ROOT"/lab-????????????????; do
    if [ ! -d "$d" ] || [ "$d" = "$DIR" ]; then continue; fi
    if ( flock -xn 7 || exit 1; rm -rf "$d" ) 7>"$d.lock"; then
      rm -f "$d.lock"; say "pruned old $d"
    fi
  done
}

build_cache() {
  local pkg=$1 ver=$2 dir=$3 kver=${1#linux-image-} b deb debs sha m f n
  b=$dir.build.$$
  # Leftovers of failed builds of this key (we hold its lock: nobody else is building it).
  rm -rf "$dir" "$dir".build.*; mkdir -p "$b"
  say "building L1 kernel+initramfs cache in $dir ($pkg $ver)"
  command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing (apt-get install qemu-system-x86)"
  [ -x "$BUSYBOX" ] || die "$BUSYBOX missing (apt-get install busybox-static)"
  command -v depmod >/dev/null || die "depmod missing (apt-get install kmod)"
  command -v cpio >/dev/null || die "cpio missing (apt-get install cpio)"

  # The .deb (70 MB): reuse an identical one from an older lab-* dir (script edits change the key
  # but not the kernel), else apt-get download it. apt checks the hash of what it downloads.
  sha=$(apt-cache show --no-all-versions "$pkg=$ver" | awk '$1 == "SHA256:" {print $2; exit}')
  for f in "$CACHE_ROOT"/lab-*/"${pkg}_"*.deb; do
    if [ ! -f "$f" ] || [ -z "$sha" ]; then continue; fi
    if [ "$(sha256sum < "$f" | cut -d' ' -f1)" = "$sha" ]; then cp "$f" "$b/"; break; fi
  done
  debs=("$b"/*.deb)
  if [ ! -f "${debs[0]}" ]; then
    # apt-get download writes into the current directory.
    if ! (cd "$b" && apt-get download "$pkg=$ver") >"$b/apt.log" 2>&1; then
      cat "$b/apt.log" >&2
      die "cannot fetch $pkg=$ver with apt-get download (mirror reachable? apt-get update done?)"
    fi
    debs=("$b"/*.deb)
  fi
  deb=${debs[0]}
  dpkg-deb -x "$deb" "$b/root"
  rm -rf "$b/root/usr"
  [ -f "$b/root/boot/vmlinuz-$kver" ] || die "no boot/vmlinuz-$kver in $deb"
  depmod -b "$b/root" "$kver"

  # Initramfs: static busybox, the boot modules, two init stages.
  local ir=$b/initramfs
  mkdir -p "$ir"/{bin,dev,proc,sys,lower,rw,newroot,mods}
  cp "$BUSYBOX" "$ir/bin/busybox"
  n=0
  for m in $L1_MODULES; do
    modprobe -d "$b/root" -S "$kver" --show-depends "$m" || die "module $m not in $pkg"
  done | awk '$1 == "insmod" && !seen[$2]++ {print $2}' |
  while read -r f; do
    n=$((n + 1))
    cp "$f" "$ir/mods/$(printf %02d "$n")-${f##*/}"
  done
  # Where L1 finds the full module tree (for modprobe on demand): the final cache path, as the
  # host's / is L1's 9p lower layer.
  printf 'KVER=%s\nMODTREE=%s\n' "$(shq "$kver")" "$(shq "$dir/root/lib/modules/$kver")" > "$ir/lab.conf"
  write_init1 > "$ir/init"
  write_init2 > "$ir/init2"
  chmod 755 "$ir/init" "$ir/init2"
  (cd "$ir" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) > "$b/initramfs.cpio.gz"
  rm -rf "$ir"
  ln -s "root/boot/vmlinuz-$kver" "$b/vmlinuz"
  echo "$pkg=$ver" > "$b/ready"
  mv "$b" "$dir"
  say "cache ready: $dir"
}

# Stage 1, L1's /init (busybox sh, PID 1 in the initramfs): modules, root = 9p + overlay,
# the I/O share, then switch_root so L1's root is a real mount (pivot_root works in it).
write_init1() {
  cat <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs dev /dev
# No /dev/console in the cpio (no mknod needed to build it): open it now.
exec < /dev/console > /dev/console 2>&1
log() { echo "brig-lab: $*"; }
fail() { log "FATAL: $*"; poweroff -f; sleep 60; }
mount -t proc proc /proc
mount -t sysfs sys /sys
. /lab.conf
log "init at uptime $(cut -d' ' -f1 /proc/uptime)"
for m in /mods/*.ko; do
  out=$(insmod "$m" 2>&1) || log "insmod ${m##*/}: $out"
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower || fail "9p root"
# tmpfs upper: everything L1 writes lives in (lazily allocated) RAM.
mount -t tmpfs -o size=90%,mode=0755 rw /rw || fail "tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || fail "overlay"
N=/newroot
for d in dev proc sys; do mount -o move /$d $N/$d || fail "move /$d"; done
mkdir -p $N/dev/pts $N/dev/shm
# What udev would add and devtmpfs does not (bash's <(...) needs /dev/fd).
ln -sf /proc/self/fd $N/dev/fd
ln -sf /proc/self/fd/0 $N/dev/stdin
ln -sf /proc/self/fd/1 $N/dev/stdout
ln -sf /proc/self/fd/2 $N/dev/stderr
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts $N/dev/pts
mount -t tmpfs -o mode=1777 shm $N/dev/shm
mount -t tmpfs -o mode=0755 run $N/run
mount -t tmpfs -o mode=1777 tmp $N/tmp
mount -t cgroup2 cgroup2 $N/sys/fs/cgroup || log "no cgroup2"
# The full module tree of this kernel, for modprobe / kernel autoload later.
mkdir -p "$N/lib/modules/$KVER" && mount -o bind "/lower$MODTREE" "$N/lib/modules/$KVER" || log "no module tree"
mkdir -p $N/run/brig-lab/io
# Writable 9p share of the host's per-run dir: the command script comes in, rc goes out.
# No cache, so a write has reached the host when it returns.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 brigio $N/run/brig-lab/io || fail "9p io"
cp /bin/busybox /init2 $N/run/brig-lab/
hostname brig-lab
ip link set lo up
log "root ready at uptime $(cut -d' ' -f1 $N/proc/uptime)"
exec switch_root $N /run/brig-lab/busybox sh /run/brig-lab/init2
EOF
}

# Stage 2, PID 1 on the new root (static busybox from /run): run the command, report, power off.
write_init2() {
  cat <<'EOF'
B=/run/brig-lab/busybox
IO=/run/brig-lab/io
log() { echo "brig-lab: $*" > /dev/console; }
port=
for d in /sys/class/virtio-ports/*; do
  [ "$($B cat "$d/name" 2>/dev/null)" = brig.out ] && port=/dev/${d##*/}
done
if [ -z "$port" ] || [ ! -c "$port" ]; then log "FATAL: no virtio port brig.out"; $B poweroff -f; fi
if [ -s $IO/share ]; then
  share=$($B cat $IO/share)
  $B mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 brigshare "$share" ||
    { log "FATAL: cannot mount the shared directory $share"; $B poweroff -f; }
fi
log "command starts at uptime $($B cut -d' ' -f1 /proc/uptime)"
$B cut -d' ' -f1 /proc/uptime > $IO/started
# Heartbeat for the host's watchdog: a frozen L1 stops writing it (see FREEZE_TIMEOUT).
( while $B sleep 10; do $B cut -d' ' -f1 /proc/uptime > $IO/alive; done ) < /dev/null > /dev/null 2>&1 &
hb=$!
# Kernel text symbols for l1_state (once per lab cache; L1 boots with nokaslr so they hold).
[ -e $IO/want-kallsyms ] && $B grep -E ' [tT] ' /proc/kallsyms > $IO/kallsyms.tmp && $B mv $IO/kallsyms.tmp $IO/kallsyms
# env -i: the command sees only what the host-written script exports. The script runs under
# the host's /bin/sh: busybox sh (and env) would run their own applets instead of PATH's
# binaries for names like ls or sh.
$B env -i /bin/sh $IO/cmd < /dev/null > "$port" 2>&1
rc=$?
kill $hb 2>/dev/null
echo "$rc" > $IO/rc.tmp && $B mv $IO/rc.tmp $IO/rc
log "command exited $rc at uptime $($B cut -d' ' -f1 /proc/uptime)"
$B poweroff -f
EOF
}

# ---------------------------------------------------------------------------------------------
# POSIX sh single-quoting (the host's /bin/sh runs the command script), safe for any byte but NUL.
shq() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }

write_cmd_script() {
  local out=$1 n path; shift
  path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  [ -d /root/.cargo/bin ] && path=/root/.cargo/bin:$path
  {
    printf 'export PATH=%s HOME=/root TERM=dumb LANG=C.UTF-8\n' "$(shq "$path")"
    for n in $(compgen -e); do
      case " RUST_LOG RUST_BACKTRACE CARGO_HOME RUSTUP_HOME ${BRIG_LAB_ENV:-} " in
        *" $n "*) ;;
        *) [[ $n == BRIG_* ]] || continue ;;
      esac
      printf 'export %s\n' "$(shq "$n=${!n}")"
    done
    printf 'cd %s || { echo "lab: cannot cd to the caller'"'"'s directory in L1 (/tmp and /run are fresh tmpfs there)" >&2; exit 125; }\n' \
      "$(shq "$PWD")"
    printf 'exec'
    for n in "$@"; do printf ' %s' "$(shq "$n")"; done
    printf '\n'
  } > "$out"
}

TMP=
QPID=
WPID=
stop_qemu() {
  kill "$1" 2>/dev/null || return 0
  for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$1" 2>/dev/null || return 0; sleep 0.5; done
  kill -9 "$1" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  set +e   # best effort: a failing kill must not skip the rest
  [ -n "$WPID" ] && kill "$WPID" 2>/dev/null
  if [ -n "$QPID" ]; then stop_qemu "$QPID"; wait "$QPID" 2>/dev/null; fi
  if [ -n "${BRIG_LAB_CONSOLE_LOG:-}" ] && [ -f "$TMP/console.log" ]; then cp "$TMP/console.log" "$BRIG_LAB_CONSOLE_LOG"; fi
  [ -n "$TMP" ] && rm -rf "$TMP"
  exit "$rc"
}

show_console() {
  say "last 40 lines of L1's console:"
  tail -n 40 "$TMP/console.log" 2>/dev/null | sed 's/^/  | /' >&2 || true
  if [ -s "$TMP/qemu.log" ]; then say "qemu said:"; sed 's/^/  | /' "$TMP/qemu.log" >&2; fi
}

# Is process $1 running (not gone, not a zombie)? kill -0 succeeds on an unreaped zombie.
alive() {
  local st
  st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }
  [ "${st%% *}" != Z ]
}

# What a frozen L1 is doing: its vCPU registers twice, a second apart, through QEMU's QMP
# socket, with the kernel symbol nearest each RIP (from L1's kallsyms, kept in the cache).
l1_state() {
  python3 - "$TMP/qmp.sock" "$DIR/kallsyms" "$TMP/io/kallsyms" <<'PY'
import bisect, json, re, socket, sys, time
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(10)
sock.connect(sys.argv[1])
f = sock.makefile("rw")
f.readline()
def call(cmd, **args):
    f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
    f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r:
            return r.get("return", r.get("error"))
call("qmp_capabilities")
syms = []
for path in sys.argv[2:]:
    try:
        for line in open(path):
            a, _, name = line.split()[:3]
            syms.append((int(a, 16), name))
        break
    except (IndexError, OSError, ValueError):
        syms = []
syms.sort()
def sym(addr):
    i = bisect.bisect_right(syms, (addr, "\xff")) - 1
    return f"{syms[i][1]}+{addr - syms[i][0]:#x}" if i >= 0 and addr - syms[i][0] < 1 << 20 else "?"
for n in range(2):
    regs = call("human-monitor-command", **{"command-line": "info registers"})
    m = re.search(r"RIP=([0-9a-f]+)", regs)
    print(f"--- info registers ({n}): RIP in {sym(int(m.group(1), 16)) if m else '?'}")
    print("\n".join(l for l in regs.splitlines() if l and not l.startswith(("YMM", "FPR", "FCW", "DR"))))
    time.sleep(1)
print("--- info lapic")
print(call("human-monitor-command", **{"command-line": "info lapic"}).rstrip())
PY
}

# One L1 boot. Sets BOOT_RESULT: rc (CMD finished), timeout, noboot, stdout, died.
boot_once() {
  local dir=$1 io=$TMP/io t0=$SECONDS rpid
  if [ -s "$dir/kallsyms" ]; then rm -f "$io/want-kallsyms"; else : > "$io/want-kallsyms"; fi
  rm -f "$TMP/nudges" "$io/started" "$io/alive" "$io/rc" "$io/rc.tmp" "$TMP/why" "$TMP/frozen.txt" "$TMP/console.log"
  # QEMU's stdout goes through a FIFO and cat to ours, so that a reader that goes away (e.g.
  # `| head`) is noticed: QEMU itself would keep the data, and the guest's port driver would
  # busy-wait at 100% CPU until the timeout.
  cat "$TMP/out" &
  rpid=$!
  # -nodefaults/-display none: only the port uses stdio. stdin must never reach EOF: QEMU takes
  # EOF on stdin as "host side closed" and the guest's writes to the port then stall forever.
  # So stdin is a FIFO that this shell holds open read-write: no data, no EOF, and no terminal
  # for QEMU to put into raw mode. timeout(1) is only a safety net for when this script itself
  # is SIGKILLed (no trap runs then); the watchdog below does the real timing.
  # idle=poll: L1 never halts its vCPU. With HLT, L1 sometimes stopped for good under TCG
  # (vCPU idle, timers never firing again; a device interrupt could still wake it), seen in
  # long virtio-fs benchmarks and once in the e2e suite. The QMP socket is for l1_state.
  timeout -k 10 $((LAB_TIMEOUT + 60)) qemu-system-x86_64 -M q35,accel=tcg -cpu max -smp 1 -m "$LAB_MEM" \
    -nodefaults -no-user-config -display none -monitor none -no-reboot \
    -qmp "unix:$TMP/qmp.sock,server=on,wait=off" \
    -kernel "$dir/vmlinuz" -initrd "$dir/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 loglevel=4 mitigations=off idle=poll nokaslr" \
    -serial "file:$TMP/console.log" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs "local,path=$io,mount_tag=brigio,security_model=none" \
    ${SHARE:+-virtfs "local,path=$SHARE,mount_tag=brigshare,security_model=none"} \
    -device virtio-rng-pci \
    -device virtio-serial-pci -chardev stdio,id=out,signal=off \
    -device virtserialport,chardev=out,name=brig.out \
    <&8 > "$TMP/out" 2> "$TMP/qemu.log" &
  QPID=$!
  # Watchdog in a subshell, so the main shell can simply `wait` for QEMU.
  (
    nudged=0 stall=0
    while kill -0 "$QPID" 2>/dev/null; do
      e=$((SECONDS - t0))
      if [ ! -e "$io/started" ] && [ "$e" -ge "$BOOT_TIMEOUT" ]; then echo noboot > "$TMP/why"; break; fi
      if [ "$e" -ge "$LAB_TIMEOUT" ]; then echo timeout > "$TMP/why"; break; fi
      if ! alive "$rpid"; then echo stdout > "$TMP/why"; break; fi
      if [ -e "$io/started" ] && [ ! -e "$io/rc" ] && [ "$FREEZE_TIMEOUT" -gt 0 ]; then
        beat=$(stat -c %Y "$io/alive" 2>/dev/null || stat -c %Y "$io/started")
        now=$(date +%s)
        if [ $((now - beat)) -ge "$FREEZE_TIMEOUT" ]; then
          echo frozen > "$TMP/why"; l1_state > "$TMP/frozen.txt" 2>&1; break
        fi
        # L1's timer interrupts sometimes stop under TCG (its vCPU then idles for good, RIP
        # in the idle loop); a device interrupt restarts them. So a missing heartbeat gets a
        # byte on L1's serial port (its console driver takes and drops it), every 30 s.
        if [ $((now - beat)) -ge 30 ] && [ $((now - nudged)) -ge 30 ]; then
          printf '\n' >&8
          nudged=$now
          stall=$beat
        elif [ "$stall" -gt 0 ] && [ "$beat" -gt "$stall" ]; then
          echo "$((beat - stall))" >> "$TMP/nudges"
          stall=0
        fi
      fi
      sleep 1
    done
    # SIGTERM first: QEMU exits cleanly on it (and bash does not report a killed job).
    if [ -e "$TMP/why" ]; then stop_qemu "$QPID"; fi
  ) &
  WPID=$!
  local qrc=0
  wait "$QPID" || qrc=$?
  if [ ! -s "$dir/kallsyms" ] && [ -s "$io/kallsyms" ]; then cp "$io/kallsyms" "$dir/kallsyms.$$" && mv "$dir/kallsyms.$$" "$dir/kallsyms"; fi
  QPID=
  # All of CMD's output is out before anything else is said or done.
  wait "$rpid" 2>/dev/null || true
  kill "$WPID" 2>/dev/null || true
  wait "$WPID" 2>/dev/null || true
  WPID=
  LAB_SECONDS=$((SECONDS - t0))
  if [ -s "$TMP/nudges" ]; then
    say "L1 stalled $(wc -l < "$TMP/nudges") time(s), for $(tr '\n' ' ' < "$TMP/nudges")s; a device interrupt woke it (the TCG timer stall, not the command's doing)"
  fi
  if [ -s "$io/rc" ]; then BOOT_RESULT=rc
  elif [ -e "$TMP/why" ]; then BOOT_RESULT=$(cat "$TMP/why")
  elif [ ! -e "$io/started" ]; then BOOT_RESULT=noboot
  else BOOT_RESULT=died
  fi
  QEMU_RC=$qrc
}

# ---------------------------------------------------------------------------------------------
case "${1:-}" in
  --check) needs_lab; exit $? ;;
  --prepare) prepare_cache; echo "$DIR"; exit 0 ;;
  --) shift ;;
  -h|--help|*) usage ;;
esac
[ $# -ge 1 ] || usage
SHARE=
if [ -n "${BRIG_LAB_SHARE:-}" ]; then
  SHARE=$(readlink -f "$BRIG_LAB_SHARE")
  [ -d "$SHARE" ] || die "BRIG_LAB_SHARE=$BRIG_LAB_SHARE is not a directory"
  case $SHARE in /tmp/*|/run/*|*,*) die "BRIG_LAB_SHARE must not be under /tmp or /run (fresh in L1) nor contain a comma: $SHARE" ;; esac
fi
[[ $LAB_MEM =~ ^[0-9]+$ && $LAB_TIMEOUT =~ ^[0-9]+$ && $BOOT_TIMEOUT =~ ^[0-9]+$ && $BOOT_RETRIES =~ ^[0-9]+$ && $FREEZE_TIMEOUT =~ ^[0-9]+$ && $FREEZE_RETRIES =~ ^[0-9]+$ ]] || die "BRIG_LAB_* must be integers"

prepare_cache
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
TMP=$(mktemp -d "${TMPDIR:-/tmp}/brig-lab.XXXXXX")
mkdir "$TMP/io"
mkfifo "$TMP/stdin" "$TMP/out"
exec 8<> "$TMP/stdin"
write_cmd_script "$TMP/io/cmd" "$@"
[ -z "$SHARE" ] || printf '%s' "$SHARE" > "$TMP/io/share"

attempt=0
frozen=0
while :; do
  boot_once "$DIR"
  case $BOOT_RESULT in
    rc) exit "$(cat "$TMP/io/rc")" ;;
    noboot)
      if [ "$attempt" -lt "$BOOT_RETRIES" ] && [ "$LAB_SECONDS" -lt "$LAB_TIMEOUT" ]; then
        attempt=$((attempt + 1))
        show_console
        say "L1 did not reach the command (qemu rc $QEMU_RC, ${LAB_SECONDS}s); retrying boot ($attempt/$BOOT_RETRIES)"
        continue
      fi
      show_console
      say "FAILED: L1 did not come up (qemu rc $QEMU_RC, ${LAB_SECONDS}s; boot timeout ${BOOT_TIMEOUT}s)"
      exit 125 ;;
    stdout)
      say "stdout closed; L1 stopped"
      exit 141 ;;
    frozen)
      show_console
      [ -s "$TMP/frozen.txt" ] && sed 's/^/  | /' "$TMP/frozen.txt" >&2
      say "FROZEN: L1 stopped running (no heartbeat for ${FREEZE_TIMEOUT}s, ${LAB_SECONDS}s in); L1 killed"
      if [ "$frozen" -lt "$FREEZE_RETRIES" ]; then
        frozen=$((frozen + 1))
        say "L1 froze, not the command: running it again in a fresh L1 ($frozen/$FREEZE_RETRIES)"
        continue
      fi
      exit 125 ;;
    timeout)
      show_console
      say "TIMEOUT: command did not finish within ${LAB_TIMEOUT}s (BRIG_LAB_TIMEOUT); L1 killed"
      exit 124 ;;
    *)
      show_console
      say "FAILED: L1 stopped without reporting the command's exit status (qemu rc $QEMU_RC, ${LAB_SECONDS}s)"
      exit 125 ;;
  esac
done
