#!/usr/bin/env python3
"""Re-ranking with a fusion model (bench/rerank.md): does BLIP-2's ITM head, trained here by
`clasp train --task qformer`, re-order a dual encoder's top K on held-out Flickr8k better than
the dual encoder's own cosine?

    cargo build --release && python3 bench/rerank.py [--seeds 0,1,2] [--k 16] [--steps 600]
        [--table-only]

Per seed:
1. the Q-Former (BLIP-2 stage 1: ITC + ITM + ITG) on torchvision's locked MobileNetV2 (its 7x7
   map: 49 tokens of 1280), its BERT started from MiniLM, 32 queries, batch 16, lr 1e-4, weight
   decay 0.05, into bench/.work/qformer/stage1_sSEED (resumable: an interrupted run continues);
2. the first stage: the LiT model of the same seed (bench/lit.py's `lit` row, 49.7% dev mean
   recall on seed 0), from bench/.work/lit/lit_sSEED;
3. `clasp eval retrieval --rerank itm:K --rerank-model QFORMER` on the dev split (1000 photos,
   5000 captions): each caption's top K photos and each photo's top K captions re-scored by the
   ITM head, ordered both ways from the same passes (`itm`: its match probability; `itm+sim`:
   the match logit plus the cosine, ALBEF's and LAVIS's practice).

The paired statistic is McNemar's exact test on R@1, query by query: the queries re-ranking
fixed against those it broke (two-sided binomial p). Each finished evaluation is kept small in
bench/rerank_runs/NAME.json, so the table survives the work folder and `--table-only` needs
none. CLASP_BIN runs a frozen binary (CLASP_BIN_REV names its commit).
"""

import argparse
import json
import math
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# bench/lit.py's paths, binary and helpers (its LiT runs are this bench's first stage).
from lit import CLASP, DATA, ROOT, WORK as LIT, cpu, model, sh  # noqa: E402

WORK = os.path.join(ROOT, "bench/.work/qformer")
RECORDS = os.path.join(ROOT, "bench/rerank_runs")
TABLE = os.path.join(ROOT, "bench/rerank.md")
NOTES = "<!-- notes: kept by bench/rerank.py -->"
DIRS = [("t2i", "image_retrieval"), ("i2t", "text_retrieval")]


def rev():
    return os.environ.get("CLASP_BIN_REV") or subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
        text=True).stdout.strip()


def stage1(seed, a):
    out = os.path.join(WORK, f"stage1_s{seed}")
    state = os.path.join(out, "state", "trainer.json")
    if os.path.isfile(state) and json.load(open(state))["step"] >= a.steps:
        return out
    if os.path.isfile(state):
        sh(CLASP, "train", "--resume", out)
    else:
        sh(CLASP, "train", "--task", "qformer", "--vision", model("mobilenet_v2"),
           "--text-init", model("minilm"), "--queries", "32", "--dataset", DATA,
           "--steps", str(a.steps), "--batch-size", "16", "--lr", "1e-4",
           "--weight-decay", "0.05", "--save-every", "50", "--seed", str(seed), "--output", out)
    return out


def mcnemar_p(fixed, broken):
    """Two-sided exact binomial test of fixed against broken (p = 1/2)."""
    n = fixed + broken
    if n == 0:
        return 1.0
    k = min(fixed, broken)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def evaluate(seed, k, a):
    """One evaluation re-ranks with the ITM head and orders the same passes both ways: a record
    for `itm` and one for `itm+sim`."""
    names = {score: f"{score.replace('+', '_')}_{k}_s{seed}" for score in ("itm", "itm+sim")}
    paths = {score: os.path.join(RECORDS, n + ".json") for score, n in names.items()}
    if all(os.path.isfile(p) for p in paths.values()):
        return
    lit = os.path.join(LIT, f"lit_s{seed}", "checkpoint")
    if not os.path.isdir(lit):
        sys.exit(f"{lit} is missing: run `python3 bench/lit.py --rows lit --seeds {seed}` first")
    qf = stage1(seed, a)
    res = json.loads(sh(CLASP, "eval", "retrieval", "-m", lit, "-d", DATA, "--split", "dev",
                        "--rerank", f"itm:{k}", "--rerank-model",
                        os.path.join(qf, "checkpoint"), "--json", capture=True))
    steps = json.load(open(os.path.join(qf, "state", "trainer.json")))["step"]
    keep = lambda d: {key: d[key] for key in d if "recall" in key or key.endswith(("_fixed", "_broken"))}
    rr = res["reranked"]
    for score, part in (("itm", rr), ("itm+sim", rr["other_score"])):
        rec = {"score": score, "k": k, "seed": seed, "qformer_steps": steps, "cpu": cpu(),
               "clasp_rev": rev(),
               "first_stage": {key: res[key] for key in res if "recall" in key},
               "reranked": dict(keep(part), ms_per_query=rr["ms_per_query"],
                                pairs_scored=rr["pairs_scored"], seconds=rr["seconds"])}
        os.makedirs(RECORDS, exist_ok=True)
        json.dump(rec, open(paths[score], "w"), indent=1)


def table():
    recs = [json.load(open(os.path.join(RECORDS, f))) for f in sorted(os.listdir(RECORDS))
            if f.endswith(".json")] if os.path.isdir(RECORDS) else []
    lines = ["# Re-ranking a dual encoder's top K with a Q-Former's ITM head", "",
             "Written by `bench/rerank.py` (see its header). First stage: the LiT model "
             "(MobileNetV2 locked, MiniLM trained; bench/lit.md). Re-ranker: a Q-Former trained "
             "by `clasp train --task qformer` (BLIP-2 stage 1) on the same locked MobileNetV2. "
             "Flickr8k dev: 1000 photos, 5000 captions. R@1 in %, before → after; fixed/broken: "
             "queries whose R@1 re-ranking made or lost; p: McNemar's exact two-sided test.", "",
             "| score | K | seed | Q-Former steps | t→i R@1 | i→t R@1 | mean recall | t→i fixed/broken (p) "
             "| i→t fixed/broken (p) | ms/query |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        f, rr = r["first_stage"], r["reranked"]
        cells = []
        for d, key in DIRS:
            cells.append(f"{100 * f[key + '_recall@1']:.1f} → {100 * rr[key + '_recall@1']:.1f}")
        cells.append(f"{100 * f['mean_recall']:.1f} → {100 * rr['mean_recall']:.1f}")
        for d, _ in DIRS:
            fx, br = rr[f"{d}_r1_fixed"], rr[f"{d}_r1_broken"]
            cells.append(f"{fx}/{br} ({mcnemar_p(fx, br):.2g})")
        cells.append(f"{rr['ms_per_query']:.0f}")
        lines.append(f"| {r['score']} | {r['k']} | {r['seed']} | {r['qformer_steps']} | "
                     + " | ".join(cells) + " |")
    if recs:
        lines += ["", f"Machine: {recs[-1]['cpu']}; clasp {recs[-1]['clasp_rev']}."]
    old = open(TABLE).read() if os.path.isfile(TABLE) else ""
    notes = old[old.index(NOTES):] if NOTES in old else NOTES + "\n"
    open(TABLE, "w").write("\n".join(lines) + "\n\n" + notes)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args()
    if not a.table_only:
        for seed in [int(s) for s in a.seeds.split(",")]:
            evaluate(seed, a.k, a)
            table()
    table()


if __name__ == "__main__":
    main()
