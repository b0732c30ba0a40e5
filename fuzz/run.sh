#!/usr/bin/env bash
# Runs fuzz targets one after another for SECONDS each (cargo-afl, non-interactive) and prints
# each run's figures: wall time, executions, paths found, crashes, hangs.
#
#   fuzz/run.sh SECONDS TARGET...      # e.g. fuzz/run.sh 600 query dataset
#
# Two of these side by side use both cores. Findings land in fuzz/out/TARGET/default/{crashes,hangs}.
set -euo pipefail
cd "$(dirname "$0")"
secs="$1"; shift
export AFL_SKIP_CPUFREQ=1 AFL_NO_UI=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
for t in "$@"; do
    mkdir -p out
    # A second run of a target resumes its queue.
    if [[ -d "out/$t/default/queue" ]]; then in="-"; else in="corpus/$t"; fi
    cargo afl fuzz -i "$in" -o "out/$t" -V "$secs" -t 2000 "target/release/$t" >"out/$t.log" 2>&1 || true
    s="out/$t/default/fuzzer_stats"
    if [[ -f "$s" ]]; then
        awk -v t="$t" -F' *: *' '
            $1=="run_time"{rt=$2} $1=="execs_done"{ex=$2} $1=="corpus_count"{cc=$2}
            $1=="saved_crashes"{cr=$2} $1=="saved_hangs"{hg=$2}
            END{printf "%s: %s s, %s execs, corpus %s, crashes %s, hangs %s\n", t, rt, ex, cc, cr, hg}' "$s"
    else
        echo "$t: no stats (see out/$t.log)"; tail -5 "out/$t.log"
    fi
done
