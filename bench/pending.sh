#!/usr/bin/env bash
# The long measurements the open issues still wait for, in the order that closes issues soonest.
# Each bench resumes where it stopped and keeps its records (bench/*_runs/), so this script can be
# started again in every session until all are done; a finished run is never repeated.
#
#     cargo build --release && cp target/release/clasp /tmp/clasp-pending && \
#         CLASP_BIN=/tmp/clasp-pending CLASP_BIN_REV=$(git rev-parse --short HEAD) \
#         nohup nice -n 10 bench/pending.sh >> bench/.work/pending.log 2>&1 &
#
# CLASP_BIN keeps a frozen binary, so rebuilding during the runs changes nothing; CLASP_BIN_REV
# names the commit it was built at, which the records then give (not the checkout's HEAD). Pause it for
# timings and full test runs (`pkill -STOP -f bench/pending.sh; pkill -STOP -f clasp-pending`, then
# -CONT), since they share the two cores.
set -u
cd "$(dirname "$0")/.."
run() { echo "== $(date -u +%FT%TZ) $*"; "$@" || echo "== failed ($?): $*"; }

# Issue 37: CIDEr-D with and without AnyRes at the same budget, also on full-resolution photos.
run python3 bench/bridge.py --tower mobilenet_v2 --rows mlp,mlp_anyres --seeds 0,1,2
# Issue 34: the bridge table's Q-Former rows on the MobileNetV2 tower (the resampler's budget).
run python3 bench/bridge.py --tower mobilenet_v2 --rows qformer32,qformer_blip2 --seeds 0,1,2
# Issue 34: LiT under 30% caption noise, without and with momentum distillation, 3 seeds.
for s in 0 1 2; do run python3 bench/lit.py --seeds "$s" --rows noisy,noisy_md; done
# Issue 34: re-ranking's seeds 1 and 2.
run python3 bench/rerank.py --seeds 0,1,2
# Issue 35: DPO's seeds 1 and 2.
run python3 bench/preference.py --seeds 0,1,2
# Issue 36: the native model's seeds 1 and 2 (seed 0 is recorded).
run python3 bench/native.py --seeds 0,1,2
