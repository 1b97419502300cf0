#!/bin/sh
# What `make run` shows: a microVM's agent answering over vsock, then a container in a
# microVM. Runs where guests can boot (directly, or inside the lab).
set -e
bin=$(dirname "$0")/../target/brig/bin
rootfs=$(dirname "$0")/../target/brig/busybox-rootfs
"$bin/brig" boot
"$bin/brig" run --rm "$rootfs" sh -c 'echo "hello from container $(hostname): PID $$, kernel $(uname -r), $(nproc) vCPU"'
