#!/bin/bash
# Run the end-to-end test binaries given where guests can boot, as fast as this host allows:
# directly (tests/e2e/run-all.sh) on a host with hardware KVM; else in BRIG_E2E_LABS (default
# 2) nested-KVM labs at once, one L1 per host core, which take tests from one shared queue
# (run-all.sh --queue). An L1 has one vCPU and TCG runs it on one host core, so a second L1
# nearly halves the suite's time on two cores. Exit status: 0 only if every lab ran every
# test it took and all of them passed.
#
# The binaries are taken slowest first, so that the last tests to start are short ones.
set -u
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/../.." && pwd)
lab=$top/tests/lab/run.sh

# Slowest binaries first (measured in the lab); the rest keep their order after them.
order="net_bulk cri_net cri containerd podman images network run oci_cli lifecycle userns hostile boot devices"
exes=()
for o in $order; do
  for e in "$@"; do [[ $(basename "$e") == "$o"-* ]] && exes+=("$e"); done
done
for e in "$@"; do
  known=
  for o in $order; do [[ $(basename "$e") == "$o"-* ]] && known=1; done
  [ -n "$known" ] || exes+=("$e")
done

if ! "$lab" --check >/dev/null 2>&1; then
  exec "$here/run-all.sh" "${exes[@]}"
fi

labs=${BRIG_E2E_LABS:-2}
[[ $labs =~ ^[1-9][0-9]*$ ]] || { echo "BRIG_E2E_LABS must be a positive number" >&2; exit 2; }
if [ "$labs" -eq 1 ]; then
  exec "$lab" -- "$here/run-all.sh" "${exes[@]}"
fi
# The queue must be a host directory L1 can see (not /tmp or /run, fresh in L1).
queue=$(mktemp -d "$top/target/e2e-queue.XXXXXX") || exit 2
trap 'rm -rf "$queue"' EXIT
pids=()
for w in $(seq 1 "$labs"); do
  BRIG_LAB_SHARE=$queue "$lab" -- "$here/run-all.sh" --queue "$queue" --worker "$w" "${exes[@]}" &
  pids+=($!)
  # Staggered, so that the two L1s do not load the same files over 9p at the same moment.
  sleep 5
done
status=0
for p in "${pids[@]}"; do
  wait "$p" || status=1
done
# Every test must have been run by some lab (a lab that died early leaves claims unfinished).
missing=0
for e in "${exes[@]}"; do
  for t in $("$e" --list --format terse | sed -n 's/: test$//p'); do
    key=$(basename "$e")--$t
    [ -e "$queue/done/$key" ] || { echo "e2e: $key was never finished by a lab"; missing=1; }
  done
done
[ "$missing" -eq 0 ] || status=1
exit $status
