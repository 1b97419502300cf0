#!/bin/bash
# Run every end-to-end test binary given, each test in its own process, and fail if any failed.
# Used by `make e2e-test` so that all of them share one lab boot.
#
# A test that is not done after BRIG_E2E_TEST_TIMEOUT seconds (default 300) fails: first the
# state of every Brig process is printed (what each thread waits in, guest console tails),
# then the test and what it started are killed, and the next test runs.
set -u
# `brig run` networks containers on its bridge by default (CNI plugins, iptables): slow in the
# lab and beside the point of most tests. Those about networking say --network themselves.
export BRIG_NETWORK=${BRIG_NETWORK:-none}
deadline=${BRIG_E2E_TEST_TIMEOUT:-300}
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

for exe in "$@"; do
  echo "=== $(basename "$exe")"
  tests=$("$exe" --list --format terse | sed -n 's/: test$//p') || { status=1; continue; }
  for t in $tests; do
    # Own session, so that the whole tree the test started can be killed at once.
    setsid "$exe" --exact "$t" --test-threads=1 > "$log" 2>&1 &
    pid=$!
    sleep "$deadline" &
    dog=$!
    finished=
    wait -n -p finished "$pid" "$dog"
    rc=$?
    if [ "$finished" != "$pid" ]; then
      cat "$log"
      echo "test $t ... TIMEOUT after ${deadline}s"
      diagnose "$exe"
      kill -KILL -- -"$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      pkill -KILL -x brig-vmm
      status=1
      continue
    fi
    kill "$dog" 2>/dev/null
    wait "$dog" 2>/dev/null
    if [ "$rc" -eq 0 ]; then
      grep -E "^test .* \.\.\. " "$log"
    else
      cat "$log"
      status=1
    fi
  done
done
exit $status
