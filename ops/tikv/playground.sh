#!/usr/bin/env bash
# A local TiKV for trying tidings' TiKV backend: 1 PD and 1 TiKV (or 3: TIKV_COUNT=3), no
# TiDB, no TiFlash, no monitoring, all on 127.0.0.1, started by TiUP's playground. Data is
# kept under ~/.tiup/data/tidings until `tiup clean tidings`. Not for production (one PD,
# one machine): see topology.yaml.
#
#   curl --proto '=https' --tlsv1.2 -sSf https://tiup-mirrors.pingcap.com/install.sh | sh
#   ops/tikv/playground.sh            # Ctrl-C stops it
#   TIKV_COUNT=3 ops/tikv/playground.sh
#
# Then, in another terminal (the binary needs the tikv feature):
#   cargo build --release -p tidings --features tikv
#   export TIDINGS_STORE_BACKEND=tikv TIDINGS_TIKV_PD=127.0.0.1:2379
#   target/release/tidings keys init   # master key + dev token secret as local files
#   target/release/tidings serve
# or in tidings.toml:
#   [store]
#   backend = "tikv"
#   [store.tikv]
#   pd_endpoints = ["127.0.0.1:2379"]
#   key_prefix = "tidings/"
#
# The TiKV conformance suite runs against it with TIDINGS_TIKV_PD=127.0.0.1:2379 cargo test.
# Not run here: this machine has no TiUP and no network for it; the command line follows
# TiUP's playground flags (`tiup playground --help`).
set -euo pipefail

# Pinned so a try-out matches what the guide describes; override to try another.
TIKV_VERSION="${TIKV_VERSION:-v8.5.4}"
TIKV_COUNT="${TIKV_COUNT:-1}"

if ! command -v tiup >/dev/null 2>&1; then
  echo "playground.sh: tiup not found; install it from https://tiup.io" >&2
  echo "  (curl --proto '=https' --tlsv1.2 -sSf https://tiup-mirrors.pingcap.com/install.sh | sh)" >&2
  exit 1
fi

# --mode tikv-slim: PD and TiKV only. The counts are spelled out anyway, so the command
# says what runs. PD listens on 127.0.0.1:2379 (the playground moves to the next free port
# if that one is taken: it prints the PD endpoints it chose; use those).
exec tiup playground "$TIKV_VERSION" \
  --mode tikv-slim \
  --tag tidings \
  --host 127.0.0.1 \
  --pd 1 \
  --kv "$TIKV_COUNT" \
  --db 0 \
  --tiflash 0 \
  --without-monitor
