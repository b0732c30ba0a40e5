#!/usr/bin/env python3
"""Zero-shot classification with the LiT models of bench/lit.py (bench/lit_zeroshot.md), on real
classes: the shared CIFAR-10 sample (2000 test images, 32 px, upscaled by the preprocessing) and
the 80 COCO-mini train images labelled by their largest annotated object (COCO's instance
annotations; one folder per category that is some image's largest object).

    python3 bench/lit_zeroshot.py [--seeds 0,1,2]

Prompts: openai's 18 CIFAR templates ("a photo of a {}." ...) for both. Chance is 1 / classes;
the majority-class rate is shown beside it for COCO, whose classes are unbalanced ("person" is
the largest object in a quarter of the photos), and so is the mean per-class recall, which
always answering the majority class would hold at 1 / classes. Records go to bench/lit_runs/zeroshot_s{seed}.json.
"""

import argparse
import collections
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASP = os.environ.get("CLASP_BIN", os.path.join(ROOT, "target/release/clasp"))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
WORK = os.path.join(ROOT, "bench/.work/lit")
RECORDS = os.path.join(ROOT, "bench/lit_runs")


def coco_folders():
    """COCO-mini as a folder per class (symlinks), by each image's largest object."""
    ann = json.load(open(os.path.join(SHARED, "coco-mini-train/annotations/instances_train2017.json")))
    names = {c["id"]: c["name"] for c in ann["categories"]}
    files = {i["id"]: i["file_name"] for i in ann["images"]}
    best = {}
    for a in ann["annotations"]:
        if a["image_id"] not in best or a["area"] > best[a["image_id"]]["area"]:
            best[a["image_id"]] = a
    out = os.path.join(WORK, "coco_by_largest_object")
    for img, a in best.items():
        d = os.path.join(out, names[a["category_id"]])
        os.makedirs(d, exist_ok=True)
        link = os.path.join(d, files[img])
        if not os.path.islink(link):
            os.symlink(os.path.join(SHARED, "coco-mini-train/train2017", files[img]), link)
    counts = collections.Counter(names[a["category_id"]] for a in best.values())
    return out, counts


def zeroshot(model, data):
    r = subprocess.run([CLASP, "eval", "zeroshot", "-m", model, "-d", data, "--json", "--no-cache"],
                       check=True, capture_output=True, text=True)
    return json.loads(r.stdout)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0,1,2")
    a = p.parse_args()
    coco, counts = coco_folders()
    rows = []
    for s in [int(x) for x in a.seeds.split(",")]:
        model = os.path.join(WORK, f"lit_s{s}", "checkpoint")
        rec_path = os.path.join(RECORDS, f"zeroshot_s{s}.json")
        if os.path.isfile(rec_path):
            rows.append(json.load(open(rec_path)))
            continue
        if not os.path.isdir(model):
            print(f"seed {s}: no model at {model}; run bench/lit.py first", file=sys.stderr)
            continue
        c, o = zeroshot(model, os.path.join(SHARED, "cifar10")), zeroshot(model, coco)
        keys = ("acc1", "acc5", "mean_per_class_recall", "n_images", "n_classes")
        rec = {"seed": s, "cifar10": {k: c[k] for k in keys},
               "coco_largest": {k: o[k] for k in keys}}
        json.dump(rec, open(rec_path, "w"), indent=1)
        rows.append(rec)
    n = sum(counts.values())
    lines = ["# Zero-shot classification with the LiT models (bench/lit_zeroshot.py)", "",
             "| seed | CIFAR-10 top-1 / top-5 (2000 images, chance 10%) | COCO-mini by largest object "
             f"top-1 / top-5 ({n} images, {len(counts)} classes; chance {100 / len(counts):.1f}%, "
             f"majority class {100 * max(counts.values()) / n:.1f}%), mean per-class recall |", "|---|---|---|"]
    for r in rows:
        c, o = r["cifar10"], r["coco_largest"]
        lines.append(f"| {r['seed']} | {100 * c['acc1']:.1f} / {100 * c['acc5']:.1f} | "
                     f"{100 * o['acc1']:.1f} / {100 * o['acc5']:.1f}, "
                     f"{100 * o['mean_per_class_recall']:.1f} |")
    lines += ["", "COCO classes (largest object, images): " +
              ", ".join(f"{k} {v}" for k, v in counts.most_common()), ""]
    open(os.path.join(ROOT, "bench/lit_zeroshot.md"), "w").write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
