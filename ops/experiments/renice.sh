#!/bin/bash
# One `bench gateway` throughput run (32 senders, 10 s) with one process's threads reniced
# to 19 once the server the bench starts is up (`nice`), or left as they are (`plain`):
# `clients` renices the bench's own threads (its client sessions), `nats` the nats-server it
# starts; tidings serve keeps its priority. Prints the bench's rows of the log alone, the
# gateway and their ratio. TIDINGS names the binary (default: the release build of this
# checkout). Extra environment (GOMAXPROCS=1, say) reaches nats-server through the bench.
#   ops/experiments/renice.sh clients plain; ops/experiments/renice.sh clients nice
#   ops/experiments/renice.sh nats plain;    ops/experiments/renice.sh nats nice
set -euo pipefail
who=${1:?clients or nats}
mode=${2:?plain or nice}
case "$who" in clients | nats) ;; *) echo "clients or nats, not $who" >&2; exit 2 ;; esac
case "$mode" in plain | nice) ;; *) echo "plain or nice, not $mode" >&2; exit 2 ;; esac
bin=${TIDINGS:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/tidings}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
out=$dir/out.txt
"$bin" bench gateway --senders 32 --seconds 10 --fanout 0 --messages 600 --rate 600 \
  --dir "$dir" >"$out" 2>&1 &
bench=$!
if [ "$mode" = nice ]; then
  while ! pgrep -P "$bench" -f " serve" >/dev/null; do
    kill -0 "$bench" 2>/dev/null || { cat "$out" >&2; exit 1; } # the bench ended early
    sleep 0.2
  done
  case "$who" in
    clients) pids=$bench ;;
    nats) pids=$(pgrep -P "$bench" nats-server) ;;
  esac
  for pid in $pids; do
    for t in /proc/"$pid"/task/*; do renice -n 19 -p "$(basename "$t")" >/dev/null; done
    echo "reniced $who: $(ps -L -o nice= -p "$pid" | sort | uniq -c | tr -s " \n" " ")"
  done
fi
wait "$bench"
grep -E "through the gateway|log alone, in|gateway / log" "$out"
