#!/usr/bin/env python3
"""Preference alignment against object hallucination (bench/preference.md): DPO on a grounded VLM.

    cargo build --release && python3 bench/preference.py [--seeds 0,1,2] [--steps 150]
        [--limit 200] [--table-only]

For each seed s:
1. The base model: stage 1 + 2 on MobileNetV2's 7x7 map (resampler N = 16 for 1000 steps, then
   LoRA r 8 for 100 steps), bench/bridge.py's `mnv2_stage12` row of the same seed (made by
   `bench/bridge.py --tower mobilenet_v2 --rows stage12` when missing).
2. Preference pairs from Flickr8k train (`clasp prefs --mode swap,other --seed s`): the chosen
   answer a reference caption, the rejected one that caption with an object swapped for an
   absent, co-occurring one, or another photo's caption.
3. DPO (`clasp train --task dpo`): the base model's adapter trained on the pairs against the
   base model itself (β 0.1, sigmoid loss, batch 8, lr 1e-4, --steps).
4. Before and after, on the same photos: `clasp eval caption` on --limit Flickr8k dev photos
   (CIDEr-D against the photo's references and a wrong photo's; CHAIR_i and CHAIR_s, objects
   from the references), on the 80 COCO-mini photos (CHAIR with COCO's instance annotations),
   and `clasp eval pope` on COCO-mini (random, popular, adversarial negatives).
   Paired over photos: the change in each photo's CIDEr-D (paired t) and in whether its caption
   hallucinates (McNemar's exact test on the photos that flip).

Resumable: finished runs are not repeated, an interrupted DPO run continues. Work goes to
bench/.work/preference/; each finished measurement is kept small in bench/preference_runs/ and
the table is always written from those records.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASP = os.environ.get("CLASP_BIN", os.path.join(ROOT, "target/release/clasp"))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared"))
FLICKR = "flickr8k:" + os.path.join(SHARED, "data/flickr8k")
COCO = "coco:" + os.path.join(SHARED, "data/coco-mini-train/annotations/captions_train2017.json")
WORK = os.path.join(ROOT, "bench/.work/preference")
BRIDGE = os.path.join(ROOT, "bench/.work/bridge_mnv2")
RECORDS = os.path.join(ROOT, "bench/preference_runs")
NOTES = "<!-- notes: kept by bench/preference.py -->"


def sh(*args, capture=False):
    print("+", " ".join(args), file=sys.stderr, flush=True)
    r = subprocess.run(args, check=True, capture_output=capture, text=True)
    return r.stdout if capture else None


def base_model(seed):
    ckpt = os.path.join(BRIDGE, f"stage12_100_s{seed}", "checkpoint")
    if not os.path.isfile(os.path.join(ckpt, "adapter_model.safetensors")):
        sh(sys.executable, os.path.join(ROOT, "bench/bridge.py"), "--tower", "mobilenet_v2",
           "--rows", "stage12", "--seeds", str(seed))
    return ckpt


def dpo_model(seed, base, steps):
    out = os.path.join(WORK, f"dpo_{steps}_s{seed}")
    state = os.path.join(out, "state", "state.json")
    if os.path.isfile(state) and json.load(open(state))["step"] >= steps:
        return os.path.join(out, "checkpoint")
    prefs = os.path.join(WORK, f"prefs_s{seed}.jsonl")
    if not os.path.isfile(prefs):
        sh(CLASP, "prefs", "-d", FLICKR, "--split", "train", "--mode", "swap,other",
           "--seed", str(seed), "-o", prefs)
    if os.path.isdir(os.path.join(out, "state")):
        sh(CLASP, "train", "--resume", out)
    else:
        sh(CLASP, "train", "--task", "dpo", "--init", base, "--prefs", prefs, "--steps", str(steps),
           "--batch-size", "8", "--lr", "1e-4", "--beta", "0.1", "--seed", str(seed),
           "--save-every", "25", "--output", out)
    return os.path.join(out, "checkpoint")


def measure(model, name, limit):
    """What one model scores; kept in bench/preference_runs/NAME.json."""
    rec_path = os.path.join(RECORDS, f"{name}.json")
    if os.path.isfile(rec_path):
        return json.load(open(rec_path))
    rep = os.path.join(WORK, f"report_{name}")
    cap = json.loads(sh(CLASP, "eval", "caption", "-m", model, "-d", FLICKR, "--split", "dev",
                        "--limit", str(limit), "--json", "--report", rep, capture=True))
    e = json.load(open(os.path.join(rep, "captions.json")))
    coco = json.loads(sh(CLASP, "eval", "caption", "-m", model, "-d", COCO, "--json",
                         capture=True))
    pope = json.loads(sh(CLASP, "eval", "pope", "-m", model, "-d", COCO, "--json", capture=True))
    rec = {
        "model": name, "cider_d": cap["scores"]["cider_d"],
        "wrong_cider_d": cap["wrong_photos"]["cider_d"],
        "chair_i": cap["chair"]["chair_i"], "chair_s": cap["chair"]["chair_s"],
        "mentions": cap["chair"]["mentions"],
        "coco_chair_i": coco["chair"]["chair_i"], "coco_chair_s": coco["chair"]["chair_s"],
        "coco_cider_d": coco["scores"]["cider_d"],
        "pope": {r["negatives"]: {k: r["scores"][k] for k in ("f1", "accuracy", "yes_ratio")}
                 for r in pope["runs"]},
        # Per photo, for the paired statistics.
        "per_image_cider": [x["cider_d"] for x in e["scores"]["per_image"]],
        "per_image_hallucinates": [bool(c["hallucinated"]) for c in e["chair"]["own"]["per_caption"]],
        "distinct": len({c["caption"] for c in e["captions"]}),
        "examples": [(c["image"].rsplit("/", 1)[-1], c["caption"]) for c in e["captions"][:6]],
    }
    os.makedirs(RECORDS, exist_ok=True)
    json.dump(rec, open(rec_path, "w"), indent=1)
    return rec


def paired_t(d):
    if len(d) < 2 or statistics.stdev(d) == 0:
        return float("nan")
    return statistics.mean(d) / (statistics.stdev(d) / math.sqrt(len(d)))


def mcnemar(before, after):
    """Exact two-sided McNemar p on the photos whose caption flips (hallucinating or not)."""
    b = sum(1 for x, y in zip(before, after) if x and not y)  # fixed
    c = sum(1 for x, y in zip(before, after) if y and not x)  # broken
    n = b + c
    if n == 0:
        return b, c, 1.0
    k = min(b, c)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return b, c, min(1.0, 2 * p)


def table(seeds, steps):
    rows = []
    for s in seeds:
        try:
            before = json.load(open(os.path.join(RECORDS, f"base_s{s}.json")))
            after = json.load(open(os.path.join(RECORDS, f"dpo_{steps}_s{s}.json")))
        except FileNotFoundError:
            continue
        rows.append((s, before, after))
    lines = ["# Preference alignment against object hallucination (DPO on a grounded VLM)", "",
             "Written by `bench/preference.py`. Base: MobileNetV2 stage 1 + 2 (bench/bridge_mobilenet.md's "
             f"stage12 row). DPO: {steps} steps of 8 pairs from `clasp prefs --mode swap,other` on "
             "Flickr8k train, β 0.1, lr 1e-4, the base model as the reference. Flickr8k: 200 dev "
             "photos, CHAIR's objects from the references; COCO-mini: 80 photos, objects from COCO's "
             "instance annotations and references; POPE on COCO-mini.", "",
             "| seed | model | CIDEr-D | wrong photos | CHAIR_i | CHAIR_s | COCO CHAIR_i | COCO CHAIR_s "
             "| POPE F1 rand / pop / adv | yes-ratio | distinct |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s, b, a in rows:
        for label, r in (("base", b), ("DPO", a)):
            p = r["pope"]
            lines.append(
                f"| {s} | {label} | {r['cider_d']:.3f} | {r['wrong_cider_d']:.3f} | {r['chair_i']:.3f} "
                f"| {r['chair_s']:.3f} | {r['coco_chair_i']:.3f} | {r['coco_chair_s']:.3f} | "
                f"{p['random']['f1']:.3f} / {p['popular']['f1']:.3f} / {p['adversarial']['f1']:.3f} | "
                f"{p['random']['yes_ratio']:.2f} | {r['distinct']} |")
    lines += ["", "Paired over the 200 Flickr8k dev photos (DPO − base):", "",
              "| seed | Δ CIDEr-D (paired t) | Δ CHAIR_s | photos fixed / broken (McNemar p) |",
              "|---|---|---|---|"]
    for s, b, a in rows:
        d = [y - x for x, y in zip(b["per_image_cider"], a["per_image_cider"])]
        fixed, broken, p = mcnemar(b["per_image_hallucinates"], a["per_image_hallucinates"])
        lines.append(f"| {s} | {statistics.mean(d):+.3f} ({paired_t(d):.2f}) | "
                     f"{a['chair_s'] - b['chair_s']:+.3f} | {fixed} / {broken} (p {p:.3g}) |")
    if rows:
        lines += ["", "Example captions (first dev photos), base → DPO:", ""]
        s, b, a = rows[0]
        for (img, cb), (_, ca) in zip(b["examples"], a["examples"]):
            lines.append(f"- {img}: {cb} → {ca}")
    path = os.path.join(ROOT, "bench/preference.md")
    notes = ""
    if os.path.isfile(path):
        old = open(path).read()
        if NOTES in old:
            notes = old[old.index(NOTES):]
    open(path, "w").write("\n".join(lines) + "\n\n" + (notes or NOTES + "\n"))
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    os.makedirs(WORK, exist_ok=True)
    if not a.table_only:
        for s in seeds:
            base = base_model(s)
            measure(base, f"base_s{s}", a.limit)
            measure(dpo_model(s, base, a.steps), f"dpo_{a.steps}_s{s}", a.limit)
            table(seeds, a.steps)
    table(seeds, a.steps)


if __name__ == "__main__":
    main()
