#!/usr/bin/env bash
# The PostgreSQL store against the embedded one, in one run (bench/RESULTS.md):
# indexing throughput on the same photos, then k-NN latency and HNSW recall over
# synthetic 512-d vectors for the embedded store, one PostgreSQL node, a
# two-shard coordinator and a streaming replica. Starts its five servers on
# loopback with scripts/postgres.sh and destroys them on exit.
#
#   bench/pg_store.sh [--sizes 100000[,1000000]] [--photos N] [--rounds R] [--model DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
ports=(55501 55502 55503 55504 55505)
cleanup() { for p in "${ports[@]}"; do scripts/postgres.sh destroy "$p" || true; done; }
trap cleanup EXIT
cleanup
url() { echo "postgres://clasp:clasp@127.0.0.1:$1/clasp"; }
scripts/postgres.sh start 55501 >/dev/null
scripts/postgres.sh replica 55501 55502 >/dev/null 2>&1
for p in 55503 55504 55505; do scripts/postgres.sh start "$p" >/dev/null; done
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|fma|f16c)' | sort -u | xargs)"
model=tests/fixtures/core/tiny-clip
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --model) model="$2"; shift 2 ;;
        *) args+=("$1" "$2"); shift 2 ;;
    esac
done
cargo build --release --example bench_index >/dev/null 2>&1
target/release/examples/bench_index postgres --single "$(url 55501)" --replica "$(url 55502)" \
    --sharded "$(url 55503)" --shards "$(url 55504),$(url 55505)" --model "$model" "${args[@]}"
