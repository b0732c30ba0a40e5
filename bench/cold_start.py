#!/usr/bin/env python3
"""Cold start: one `clasp search "a dog on a beach" --no-index` process, end to end, on an
embedded store of 100,000 synthetic vectors made for the ViT-B/32 config (random weights, the
real config: bench/embed_throughput.py makes it), as a user runs it (rclip's complaint: most of a
search's time is loading the model).

    cargo build --release && cargo build --release --example bench_index
    python3 bench/cold_start.py [--n 100000] [--runs 7] [--cold] [--compare OTHER_CLASP_BIN]

Prints the CPU flags, the median and min wall time over the runs (the page cache warm after the
first: what a user's second search sees), and, with `--cold`, one run's time with the model and
store files evicted from the page cache first. `--compare` runs another clasp binary (an older
build) interleaved with this one, run for run, and prints the ratio of the medians.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from embed_throughput import checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "bench", ".work", "cold_start")
CLASP = os.environ.get("CLASP_BIN", os.path.join(ROOT, "target/release/clasp"))
BENCH = os.path.join(ROOT, "target/release/examples/bench_index")


def cpu_flags():
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0]
    keep = [f for f in flags.split() if f.startswith(("avx", "fma", "f16c"))]
    return " ".join(sorted(set(keep)))


def evict(path):
    """Drops one file's pages from the page cache (posix_fadvise DONTNEED)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--compare", help="another clasp binary, timed interleaved")
    ap.add_argument("--cold", action="store_true",
                    help="also time a run with the model and store files evicted from the page cache")
    a = ap.parse_args()
    model = checkpoint()
    os.makedirs(WORK, exist_ok=True)
    store = os.path.join(WORK, f"store_{a.n}.sqlite")
    photos = os.path.join(WORK, "photos")
    os.makedirs(photos, exist_ok=True)
    if not os.path.exists(store):
        subprocess.run([BENCH, "synth-store", model, store + ".tmp", photos, str(a.n)], check=True)
        for suffix in ["", "-wal", "-shm"]:
            if os.path.exists(store + ".tmp" + suffix):
                os.replace(store + ".tmp" + suffix, store + suffix)
        # The snapshot and ANN files follow the store's name.
        for f in os.listdir(WORK):
            if f.startswith(f"store_{a.n}.sqlite.tmp"):
                os.replace(os.path.join(WORK, f), os.path.join(WORK, f.replace(".tmp", "")))
    cmd = [CLASP, "search", "a dog on a beach", "--store", store, "--dir", photos, "--no-index",
           "-k", "10", "--quiet"]
    print(f"CPU flags: {cpu_flags()}")
    print(f"clasp: {CLASP}\nstore: {a.n} vectors, model {model}")
    # One run first to make the snapshot and (for 100k) the HNSW graph, which a store keeps.
    subprocess.run(cmd, check=True, capture_output=True)
    if a.cold:
        for f in os.listdir(model) + os.listdir(WORK):
            p = os.path.join(model, f) if os.path.exists(os.path.join(model, f)) else os.path.join(WORK, f)
            if os.path.isfile(p):
                evict(p)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        print(f"cold (files evicted from the page cache): {time.perf_counter() - t:.3f} s")
    bins = [CLASP] + ([a.compare] if a.compare else [])
    times = {b: [] for b in bins}
    for _ in range(a.runs):
        for b in bins:
            t = time.perf_counter()
            subprocess.run([b] + cmd[1:], check=True, capture_output=True)
            times[b].append(time.perf_counter() - t)
    for b in bins:
        ts = times[b]
        print(f"{b}: warm page cache, {a.runs} runs: median {statistics.median(ts):.3f} s, "
              f"min {min(ts):.3f} s, max {max(ts):.3f} s")
    if a.compare:
        r = statistics.median(times[CLASP]) / statistics.median(times[a.compare])
        print(f"ratio of medians (this / compared): {r:.3f}")

if __name__ == "__main__":
    main()
