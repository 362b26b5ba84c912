#!/bin/bash
# One `bench gateway` throughput run (32 senders, 10 s) with the bench's own threads (its
# client sessions) reniced to 19 once the server it starts is up (`nice`), or left as they
# are (`plain`); the server and nats-server keep their priority. Prints the bench's rows of
# the log alone, the gateway and their ratio. TIDINGS names the binary (default: the
# release build of this checkout).
#   ops/experiments/renice-clients.sh plain; ops/experiments/renice-clients.sh nice
set -euo pipefail
mode=${1:?plain or nice}
bin=${TIDINGS:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/tidings}
dir=$(mktemp -d)
out=$dir/out.txt
"$bin" bench gateway --senders 32 --seconds 10 --fanout 0 --messages 600 --rate 600 \
  --dir "$dir" >"$out" 2>&1 &
bench=$!
if [ "$mode" = nice ]; then
  while ! pgrep -P "$bench" -f " serve" >/dev/null; do sleep 0.2; done
  for t in /proc/$bench/task/*; do renice -n 19 -p "$(basename "$t")" >/dev/null; done
  echo "reniced: $(ps -L -o nice= -p "$bench" | sort | uniq -c | tr -s " \n" " ")"
fi
wait "$bench"
grep -E "through the gateway|log alone, in|gateway / log" "$out"
rm -rf "$dir"
