#!/bin/bash
# Run every end-to-end test binary given, each test in its own process, and fail if any failed.
# Used by `make e2e-test` so that all of them share one lab boot.
#
#   run-all.sh EXE...                          every test of every EXE, in order
#   run-all.sh --queue DIR --worker NAME EXE...  the same list, shared with other workers
#       (e.g. one per lab L1, see tests/e2e/run-in-labs.sh): a worker runs a test only if it
#       claims it first (mkdir DIR/claim/KEY, atomic on the host even over 9p), so the
#       workers split the list between them as they go. A worker started again under the
#       same NAME (a fresh L1 after a freeze) first runs what it claimed and did not finish.
#
# A test that is not done after BRIG_E2E_TEST_TIMEOUT seconds (default 450; twice that for
# net_bulk's, which move 2 GiB each through the lab's emulated NIC) fails: first the
# state of every Brig process is printed (what each thread waits in, guest console tails),
# then the test and what it started are killed, and the next test runs. Each test's line
# ends with how long it took.
set -u
# `brig run` networks containers on its bridge by default (CNI plugins, iptables): slow in the
# lab and beside the point of most tests. Those about networking say --network themselves.
export BRIG_NETWORK=${BRIG_NETWORK:-none}
deadline=${BRIG_E2E_TEST_TIMEOUT:-450}
queue=
worker=
while [ $# -gt 0 ]; do
  case $1 in
    --queue) queue=$2; shift 2 ;;
    --worker) worker=$2; shift 2 ;;
    *) break ;;
  esac
done
if [ -n "$queue" ]; then
  [ -n "$worker" ] || { echo "run-all.sh: --queue needs --worker NAME" >&2; exit 2; }
  mkdir -p "$queue/claim" "$queue/done" || exit 2
fi
status=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Everything a hung test leaves to look at.
diagnose() {
  echo "--- e2e: processes"
  ps -eo pid,ppid,stat,etimes,wchan:24,args --forest | grep -v ' \[.*\]$'
  for pid in $(pgrep -x 'brig|brig-vmm|brig-agent'; pgrep -f "$1"); do
    for task in /proc/"$pid"/task/*; do
      echo "--- e2e: $(cat "$task/comm" 2>/dev/null) (pid $pid, tid ${task##*/}) waits in $(cat "$task/wchan" 2>/dev/null)"
      sed 's/^/    /' "$task/stack" 2>/dev/null | head -n 12
    done
  done
  for f in $(find /run/brig-e2e -name console.log 2>/dev/null); do
    echo "--- e2e: $f (last 20 lines)"
    tail -n 20 "$f"
  done
}

# Is test KEY this worker's to run? Without a queue every test is.
mine() {
  [ -z "$queue" ] && return 0
  [ -e "$queue/done/$1" ] && return 1
  if mkdir "$queue/claim/$1" 2>/dev/null; then
    echo "$worker" > "$queue/claim/$1/by"
    return 0
  fi
  # Claimed before: ours only if this worker took it and did not finish (it was restarted).
  [ "$(cat "$queue/claim/$1/by" 2>/dev/null)" = "$worker" ]
}

for exe in "$@"; do
  name=$(basename "$exe")
  tests=$("$exe" --list --format terse | sed -n 's/: test$//p') || { echo "=== $name: cannot list its tests"; status=1; continue; }
  header=
  for t in $tests; do
    key=$name--$t
    mine "$key" || continue
    [ -n "$header" ] || { echo "=== $name${worker:+ (worker $worker)}"; header=1; }
    limit=$deadline
    [[ $name == net_bulk-* ]] && limit=$((deadline * 2))
    t0=$SECONDS
    # Own session, so that the whole tree the test started can be killed at once.
    setsid "$exe" --exact "$t" --test-threads=1 > "$log" 2>&1 &
    pid=$!
    sleep "$limit" &
    dog=$!
    finished=
    wait -n -p finished "$pid" "$dog"
    rc=$?
    if [ "$finished" != "$pid" ]; then
      cat "$log"
      echo "test $t ... TIMEOUT after ${limit}s"
      diagnose "$exe"
      kill -KILL -- -"$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      pkill -KILL -x brig-vmm
      status=1
      [ -n "$queue" ] && echo timeout > "$queue/done/$key"
      continue
    fi
    kill "$dog" 2>/dev/null
    wait "$dog" 2>/dev/null
    if [ "$rc" -eq 0 ]; then
      grep -E "^test .* \.\.\. " "$log" | sed "s/\$/ ($((SECONDS - t0)) s)/"
    else
      cat "$log"
      echo "(test $t took $((SECONDS - t0)) s)"
      status=1
    fi
    [ -n "$queue" ] && echo "$rc" > "$queue/done/$key"
  done
done
exit $status
