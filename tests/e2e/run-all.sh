#!/bin/sh
# Run every end-to-end test binary given, one test at a time, and fail if any failed.
# Used by `make e2e-test` so that all of them share one lab boot.
status=0
for exe in "$@"; do
  echo "=== $(basename "$exe")"
  "$exe" --test-threads=1 || status=1
done
exit $status
