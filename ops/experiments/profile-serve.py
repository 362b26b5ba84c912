#!/usr/bin/env python3
"""Where `tidings serve`'s CPU goes: reads `perf script` output (samples with DWARF call
stacks) on stdin and prints the share of samples in each part of the server.

Each sample is counted once, in the first part (in the order below) that one of its frames
belongs to. The parts are named by the functions that own the work: the store's commit
and reads (on the blocking pool), the sequencer's stages, the publisher, the hubs, the
sessions, the NATS connection and tokio's idle loop.

    perf record -F 499 --call-graph dwarf,16384 -p <serve pid> -o serve.data -- sleep 3
    perf script -i serve.data | ops/experiments/profile-serve.py
"""

import collections
import sys

PARTS = [
    ("store commit (blocking pool)", "embedded::{impl#3}::commit"),
    ("store reads (blocking pool)", "store::embedded"),
    ("sealing and opening off the runtime", "bus_crypto"),
    ("sequencer: apply and seal a batch", "apply_batch"),
    ("sequencer: prepare", "Writer>::prepare"),
    ("sequencer: answer the batch", "Writer>::complete"),
    ("sequencer: the rest of its loop", "pipeline::{impl#0}::run"),
    ("publisher", "publisher::run"),
    ("hubs", "hub::"),
    ("sessions: writing frames", "session::serve::{async_fn#0}::{async_block_env#2}"),
    ("sessions: reading and answering", "session::"),
    ("the NATS connection", "async_nats::connect_with_options"),
    ("hot search index", "hot_index"),
    ("tokio: parking and waking workers", "park"),
]


def main() -> None:
    counts = collections.Counter()
    for sample in sys.stdin.read().split("\n\n"):
        if not sample.strip():
            continue
        for name, needle in PARTS:
            if needle in sample:
                counts[name] += 1
                break
        else:
            counts["other"] += 1
    total = sum(counts.values()) or 1
    print("| part of tidings serve | samples | share |")
    print("|---|---:|---:|")
    for name, n in counts.most_common():
        print(f"| {name} | {n} | {100 * n / total:.1f}% |")


if __name__ == "__main__":
    main()
