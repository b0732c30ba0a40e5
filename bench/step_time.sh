#!/bin/bash
# Training step time, clasp against the PyTorch reference, interleaved on one machine.
#
#   bench/step_time.sh ROUNDS [CLASP_BIN...]     (default: target/release/clasp)
#
# Each round runs every clasp binary, then bench/train_reference.py, for 24 steps of the tiny
# preset at batch 32 from the same init and data order, and prints the median of steps 5-24:
# - clasp: the wall time of the whole step (its workers decode the next batches meanwhile);
# - PyTorch, twice: loading each batch serially (0 workers) and with one DataLoader worker process
#   loading ahead (1 worker); each as the wait for the batch plus the step (data_s + step_s), and
#   the step alone.
# Pause other work on the machine while it runs; compare within a round, not across runs.
set -e
cd "$(dirname "$0")/.."
S=$(readlink -f ../shared)
R=${1:?usage: bench/step_time.sh ROUNDS [CLASP_BIN...]}
shift
BINS=("$@")
[ ${#BINS[@]} -gt 0 ] || BINS=(target/release/clasp)
W=bench/.work/step_time
rm -rf $W && mkdir -p $W
D=flickr8k:$S/data/flickr8k
"${BINS[0]}" train --preset tiny --tokenizer $S/assets/clip-vit-base-patch32 --dataset $D --steps 1 \
    --batch-size 32 --crop-scale 1 --save-every 0 --output $W/init_run >/dev/null 2>&1
# Warm-up, discarded: the first run of a session reads the batches' images from disk.
"${BINS[0]}" train --init $W/init_run/init --dataset $D --steps 24 --batch-size 32 --crop-scale 1 \
    --save-every 0 --output $W/warm >/dev/null 2>&1
med() {
    python3 - "$1/metrics.jsonl" <<'EOF'
import json, statistics, sys
m = [json.loads(l) for l in open(sys.argv[1]) if "images_per_s" in l][4:24]
if "step_s" in m[0]:
    whole = statistics.median(x["step_s"] + x["data_s"] for x in m)
    print("%.3f (step alone %.3f)" % (whole, statistics.median(x["step_s"] for x in m)))
else:
    print("%.3f" % statistics.median(32 / x["images_per_s"] for x in m))
EOF
}
for r in $(seq "$R"); do
    line="round $r:"
    for b in "${BINS[@]}"; do
        rm -rf $W/c
        "$b" train --init $W/init_run/init --dataset $D --steps 24 --batch-size 32 --crop-scale 1 \
            --save-every 0 --output $W/c >/dev/null 2>&1
        line="$line $(basename "$b") $(med $W/c)"
    done
    for workers in 0 1; do
        rm -rf $W/t
        python3 bench/train_reference.py --init $W/init_run/init --dataset $S/data/flickr8k --steps 24 \
            --batch-size 32 --seed 0 --workers $workers --output $W/t >/dev/null 2>&1
        line="$line | torch, $workers loader workers: $(med $W/t)"
    done
    echo "$line"
done
