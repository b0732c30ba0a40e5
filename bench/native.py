#!/usr/bin/env python3
"""A native model trained here (bench/native.md): Emu3's design at this machine's size, a VQ
tokenizer of clasp's own joined with SmolLM2-135M-Instruct, trained by `clasp train --task native`
to caption and to draw Flickr8k train photos, measured on held-out dev photos.

    cargo build --release && python3 bench/native.py [--seeds 0] [--steps 600] [--table-only]
        [--caption-limit 200] [--draw-limit 100] [--work DIR]

For each seed s:
1. the VQ tokenizer of bench/vq.py (64 x 64 pixels, 8 x 8 codes of a 1024-code book, 300 steps;
   the same run folder, so a tokenizer bench/vq.py trained is reused);
2. `clasp assemble --native` with SmolLM2 (seed s);
3. `clasp train --task native`: --steps of batch 8, lr 1e-3 (cosine, 10% warm-up), LoRA rank 8
   on all seven projections and the image tokens' rows, draw_ratio 0.5 (half the examples draw);
4. captions: `clasp eval caption` on the first --caption-limit dev photos (greedy, at most 48
   tokens): CIDEr-D on the photos' own references against the same captions on the wrong photos,
   with the paired t of the difference;
5. drawings: for each of the first --draw-limit dev photos, its first caption drawn once
   (`clasp draw --prompts-from`, 64 x 64, guidance 3, top-k 2048, seed 0 + line), by the trained
   model and by the assembled one (the untrained control);
   - retrieval precision: a judge that never saw a drawing (bench/lit.py's frozen row: locked
     ImageNet MobileNetV2 and MiniLM with two linear heads, trained here on Flickr8k train)
     ranks the --draw-limit captions for each image; R@1 against chance (1 / n), beside the real
     photos' and the VQ reconstructions' R@1 with the same judge; the paired statistic is the t
     of each image's margin (its own caption's similarity minus the mean of the others');
   - the Fréchet distance on MobileNetV2's pooled features (`clasp eval frechet`; FID's formula,
     not FID) of the drawings, the untrained drawings and the VQ reconstructions to the real
     photos, and of the next --draw-limit dev photos to them (the sampling floor);
   - drawing speed in image tokens per second.

Work goes to bench/.work/native/ (and bench/.work/vq/ for the tokenizer); every run resumes. What
each seed measured is kept in bench/native_runs/s{seed}.json and the table is written from those
records (`--table-only` needs no work folder).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from types import SimpleNamespace

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
import lit  # noqa: E402  (the judge's recipe)
import vq  # noqa: E402  (the tokenizer's run)

CLASP = os.environ.get("CLASP_BIN", os.path.join(ROOT, "target/release/clasp"))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared"))
F8K = os.path.join(SHARED, "data/flickr8k")
FLICKR = "flickr8k:" + F8K
WORK = os.path.join(ROOT, "bench/.work/native")
RUNS = os.path.join(ROOT, "bench/native_runs")
MD = os.path.join(ROOT, "bench/native.md")


sh, model = lit.sh, lit.model


def finished(out):
    state = os.path.join(out, "state", "trainer.json")
    return os.path.isfile(state) and json.load(open(state))["step"] >= \
        json.load(open(state))["config"]["steps"]


def train(out, args):
    """`clasp train ARGS --output OUT`, resumed when OUT holds a state, skipped when done."""
    if finished(out):
        return
    if os.path.isfile(os.path.join(out, "state", "trainer.json")):
        sh(CLASP, "train", "--resume", out)
    else:
        sh(CLASP, "train", *args, "--output", out)


def judge(steps):
    """bench/lit.py's frozen row, seed 0: the image-text model that ranks the drawings."""
    out = os.path.join(WORK, "judge")
    train(out, lit.flags("frozen", 0, SimpleNamespace(steps=steps, steps_scratch=0)))
    return os.path.join(out, "checkpoint")


def dev_items(n, skip=0):
    """The dev photos [skip, skip + n) and each one's first caption."""
    names = [l.strip() for l in open(os.path.join(F8K, "Flickr_8k.devImages.txt")) if l.strip()]
    first = {}
    for line in open(os.path.join(F8K, "Flickr8k.token.txt")):
        key, cap = line.rstrip("\n").split("\t", 1)
        img, k = key.split("#")
        if k == "0":
            first[img] = cap.strip()
    names = names[skip:skip + n]
    return [os.path.join(F8K, "images", f) for f in names], [first[f] for f in names]


def write_list(path, lines):
    with open(path, "w") as f:
        f.write("".join(l + "\n" for l in lines))
    return path


def draw(model_dir, key, prompts):
    """Drawings of every prompt into WORK/drawn_KEY (kept when complete); their tokens/s."""
    out = os.path.join(WORK, f"drawn_{key}")
    speed_file = out + ".speed"
    n = len(open(prompts).read().splitlines())
    if not (os.path.isfile(speed_file) and len(os.listdir(out)) == n):
        r = subprocess.run([CLASP, "draw", "--prompts-from", prompts, "-m", model_dir, "-o", out,
                            "--seed", "0"], capture_output=True, text=True)
        sys.stderr.write(r.stderr[-2000:])
        if r.returncode != 0:
            raise SystemExit(f"clasp draw failed ({r.returncode})")
        m = re.search(r"([0-9.]+) image tokens/s", r.stderr)
        open(speed_file, "w").write(m.group(1) if m else "nan")
    files = sorted(os.path.join(out, f) for f in os.listdir(out))
    return files, float(open(speed_file).read())


def reconstructions(tok, photos):
    """The tokenizer's reconstructions of the photos (codes and back)."""
    out = os.path.join(WORK, "recon_" + os.path.basename(os.path.dirname(tok)))
    if not (os.path.isdir(out) and len(os.listdir(out)) == len(photos)):
        codes = sh(CLASP, "tokenize-image", "-m", tok, *photos, capture=True)
        path = os.path.join(WORK, "recon_codes.jsonl")
        open(path, "w").write(codes)
        sh(CLASP, "detokenize-image", "-m", tok, "--codes", path, "-o", out)
    return sorted((os.path.join(out, f) for f in os.listdir(out)),
                  key=lambda p: int(os.path.splitext(os.path.basename(p))[0]))


def t_stat(xs):
    sd = statistics.stdev(xs)
    return statistics.mean(xs) / (sd / len(xs) ** 0.5) if sd > 0 else float("nan")


def retrieval(judge_dir, images, captions):
    """The judge's R@1 of each image's own caption among all, and the paired t of the margins."""
    lst = write_list(os.path.join(WORK, "judge_images.txt"), images)
    caps = write_list(os.path.join(WORK, "judge_captions.txt"), captions)
    rows = [json.loads(l) for l in sh(CLASP, "embed", "--model", judge_dir, "--images-from", lst,
                                      "--texts-from", caps, capture=True).splitlines()]
    img = [r["embedding"] for r in rows if r["type"] == "image"]
    txt = [r["embedding"] for r in rows if r["type"] == "text"]
    assert len(img) == len(images) and len(txt) == len(captions), "an image was not embedded"
    hits, margins = 0, []
    for i, v in enumerate(img):
        sims = [sum(a * b for a, b in zip(v, t)) for t in txt]
        hits += max(range(len(sims)), key=sims.__getitem__) == i
        others = [s for j, s in enumerate(sims) if j != i]
        margins.append(sims[i] - statistics.mean(others))
    return {"r1": hits / len(img), "margin": statistics.mean(margins), "t": t_stat(margins)}


def frechet(real, generated, tower):
    a = write_list(os.path.join(WORK, "fd_real.txt"), real)
    b = write_list(os.path.join(WORK, "fd_gen.txt"), generated)
    return json.loads(sh(CLASP, "eval", "frechet", "--real", a, "--generated", b, "--tower", tower,
                         "--json", capture=True))["frechet_distance"]


def captions(model_dir, key, limit):
    path = os.path.join(WORK, f"eval_{key}.json")
    report = os.path.join(WORK, f"report_{key}")
    if not os.path.isfile(path):
        out = sh(CLASP, "eval", "caption", "-m", model_dir, "-d", FLICKR, "--split", "dev",
                 "--limit", str(limit), "--json", "--report", report, capture=True)
        open(path, "w").write(out)
    e = json.load(open(path))
    c = json.load(open(os.path.join(report, "captions.json")))
    d = [a["cider_d"] - b["cider_d"]
         for a, b in zip(c["scores"]["per_image"], c["wrong_photos"]["per_image"])]
    return {"cider_d": e["scores"]["cider_d"], "wrong": e["wrong_photos"]["cider_d"],
            "bleu_4": e["scores"]["bleu_4"], "diff": statistics.mean(d), "t": t_stat(d),
            "distinct": len({x["caption"] for x in c["captions"]}), "images": e["images"],
            "examples": [{"image": os.path.basename(x["image"]), "caption": x["caption"]}
                         for x in c["captions"][:4]]}


def measure(seed, a):
    rec_path = os.path.join(RUNS, f"s{seed}.json")
    if os.path.isfile(rec_path):
        return json.load(open(rec_path))
    os.makedirs(WORK, exist_ok=True)
    tok_run = vq.train(seed, a.vq_steps)
    tok = os.path.join(tok_run, "checkpoint")
    init = os.path.join(WORK, f"init_s{seed}")
    if not os.path.isfile(os.path.join(init, "config.json")):
        sh(CLASP, "assemble", "--native", tok, "--llm", model("smollm2"), "--seed", str(seed),
           "--output", init)
    run = os.path.join(WORK, f"native_s{seed}")
    train(run, ["--task", "native", "--init", init, "--dataset", FLICKR, "--steps", str(a.steps),
                "--batch-size", "8", "--lr", "1e-3", "--lora-rank", "8", "--seed", str(seed),
                "--save-every", "50", "--set", "draw_ratio=0.5"])
    ckpt = os.path.join(run, "checkpoint")
    metrics = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    last = {k: statistics.mean(m["losses"][k] for m in metrics[-20:] if k in m["losses"])
            for k in ("caption", "draw")}
    step_s = statistics.median(8 / m["images_per_s"] for m in metrics[2:])
    cap = captions(ckpt, f"s{seed}", a.caption_limit)
    photos, caps = dev_items(a.draw_limit)
    prompts = write_list(os.path.join(WORK, "prompts.txt"), caps)
    drawn, speed = draw(ckpt, f"s{seed}", prompts)
    drawn0, _ = draw(init, f"init_s{seed}", prompts)
    recon = reconstructions(tok, photos)
    j = judge(a.judge_steps)
    mnv2 = model("mobilenet_v2")
    floor, _ = dev_items(a.draw_limit, skip=a.draw_limit)
    rec = {
        "seed": seed, "steps": metrics[-1]["step"], "step_s": step_s, "last_losses": last,
        "captions": cap, "draw": {
            "n": len(drawn), "tokens_per_s": speed,
            "retrieval": {"drawn": retrieval(j, drawn, caps), "untrained": retrieval(j, drawn0, caps),
                          "photos": retrieval(j, photos, caps),
                          "reconstructions": retrieval(j, recon, caps)},
            "frechet": {"drawn": frechet(photos, drawn, mnv2), "untrained": frechet(photos, drawn0, mnv2),
                        "reconstructions": frechet(photos, recon, mnv2),
                        "other_photos": frechet(photos, floor, mnv2)}},
        "cpu_flags": vq.cpu_flags(),
        "clasp_rev": os.environ.get("CLASP_BIN_REV") or subprocess.run(
               ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
               text=True).stdout.strip(),
    }
    os.makedirs(RUNS, exist_ok=True)
    json.dump(rec, open(rec_path, "w"), indent=1)
    return rec


def table():
    recs = [json.load(open(os.path.join(RUNS, f))) for f in sorted(os.listdir(RUNS))] \
        if os.path.isdir(RUNS) else []
    lines = ["# A native model trained by clasp (Emu3's design at this machine's size)", "",
             "Made by `python3 bench/native.py --table-only`; its docstring holds the setup. "
             "SmolLM2-135M-Instruct with a 1024-code VQ tokenizer of clasp's own (64 x 64 pixels, "
             "8 x 8 codes; bench/vq.md), trained by `clasp train --task native` on Flickr8k train "
             "(half the examples caption, half draw), measured on held-out dev photos.", ""]
    if not recs:
        lines.append("No runs recorded yet.")
    for r in recs:
        c, d = r["captions"], r["draw"]
        rt, fd = d["retrieval"], d["frechet"]
        n = d["n"]
        lines += [
            f"## Seed {r['seed']} ({r['steps']} steps of batch 8, {r['step_s']:.1f} s a step; "
            f"clasp {r['clasp_rev']})", "",
            f"Last 20 steps' answer loss: captions {r['last_losses']['caption']:.3f}, "
            f"drawings {r['last_losses']['draw']:.3f} (nats a token).", "",
            "| captions ({} dev photos) | CIDEr-D | wrong photos | own − wrong (paired t) | "
            "BLEU-4 | distinct captions |".format(c["images"]),
            "|---|---|---|---|---|---|",
            f"| trained | {c['cider_d']:.3f} | {c['wrong']:.3f} | {c['diff']:+.3f} ({c['t']:.2f}) | "
            f"{c['bleu_4']:.3f} | {c['distinct']} |", "",
            f"| images for {n} dev captions | judge's R@1 (chance {100 / n:.0f}%) | own-caption "
            "margin (paired t) | Fréchet distance to the photos (MobileNetV2) |",
            "|---|---|---|---|",
        ]
        names = [("drawn by the trained model", "drawn"), ("drawn by the untrained model", "untrained"),
                 ("VQ reconstructions of the photos", "reconstructions"), ("the photos themselves", "photos")]
        for label, k in names:
            fdv = f"{fd[k]:.1f}" if k in fd else "0 (itself)"
            lines.append(f"| {label} | {100 * rt[k]['r1']:.1f}% | {rt[k]['margin']:+.4f} "
                         f"({rt[k]['t']:.2f}) | {fdv} |")
        lines += [f"| the next {n} dev photos (sampling floor) | — | — | {fd['other_photos']:.1f} |", "",
                  f"Drawing speed: {d['tokens_per_s']:.1f} image tokens a second (guidance doubles "
                  "the forward passes).", "", "Example captions: " + "; ".join(
                      f"{e['image']}: \"{e['caption']}\"" for e in c["examples"]), ""]
    lines.append(f"CPU flags: {recs[0]['cpu_flags'] if recs else '-'}.")
    old = open(MD).read() if os.path.isfile(MD) else ""
    marker = "<!-- notes: kept by bench/native.py -->"
    notes = old[old.index(marker):] if marker in old else marker + "\n"
    open(MD, "w").write("\n".join(lines) + "\n\n" + notes)


def main():
    global WORK, RUNS, MD
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--caption-limit", type=int, default=200)
    p.add_argument("--draw-limit", type=int, default=100)
    p.add_argument("--vq-steps", type=int, default=300, help="the tokenizer's (bench/vq.py's)")
    p.add_argument("--judge-steps", type=int, default=470, help="the judge's (bench/lit.py's)")
    p.add_argument("--work", help="work folder (default bench/.work/native); with it the "
                   "tokenizer's goes to WORK/vq, and nothing is recorded (a trial run)")
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args()
    if a.work:
        WORK, vq.WORK = a.work, os.path.join(a.work, "vq")
        RUNS, MD = os.path.join(a.work, "runs"), os.path.join(a.work, "native.md")
    if not a.table_only:
        for s in [int(x) for x in a.seeds.split(",")]:
            measure(s, a)
    table()


if __name__ == "__main__":
    main()
