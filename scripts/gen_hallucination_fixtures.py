#!/usr/bin/env python3
"""Fixtures for CHAIR and POPE (tests/eval_hallucination.rs): references written from the papers' code.

    pip install --target /tmp/chairpy textblob nltk
    PYTHONPATH=/tmp/chairpy python3 scripts/gen_hallucination_fixtures.py

The reference follows Rohrbach et al.'s `chair.py` (LisaAnne/Hallucination, utils/chair.py):
its synonyms list parsed with `s.strip().split(', ')`, its double words and qualifiers, Pattern's
`singularize` on every word (TextBlob ships Pattern's inflection code unchanged; `pattern` itself
no longer installs), the image's objects as the union of COCO's instance annotations and the
objects its reference captions mention, and every mention counted. `nltk.word_tokenize` needs
the punkt model, which cannot be downloaded here; sentences are split where a '.', '!' or '?' is
followed by a space, and each goes through NLTK's own word tokenizer (what word_tokenize does
after punkt for these captions).

Writes tests/fixtures/eval/chair.json:
  singular  - [word, singularize(word)] for every word of the synonyms list, each word's plural
              (TextBlob's pluralize), and every word of the 400 COCO-mini captions;
  objects   - for each COCO-mini image (file name): its objects as the paper collects them;
  cases     - fixed captions with the image whose objects they are scored against: the
              references of the next image (a caption scored against the wrong photo) and
              hand-written ones with the paper's special cases; for each, the mentions
              [[word, object], ...] and the hallucinated ones;
  totals    - CHAIR_i and CHAIR_s over the cases, and the counts.

and tests/fixtures/eval/pope.json, from POPE's utils.py and evaluate.py (AoiDragon/POPE):
  images    - each COCO-mini image's annotated categories (sorted), in file-name order;
  questions - for popular and adversarial negatives (3 per image): [image index, object, label]
              as `pope()` builds them; a negative that fell back to `random.choice` is recorded
              with object null (the draw is Python's);
  answers   - fixed answer strings, their reading (yes/no) and the scores of evaluate.py against
              fixed labels.
"""

import json
import os
import re

from nltk.tokenize import NLTKWordTokenizer
from textblob.en.inflect import pluralize, singularize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO = os.path.join(ROOT, "..", "shared", "data", "coco-mini-train", "annotations")
SYNONYMS = os.path.join(ROOT, "crates", "core", "src", "data", "coco_synonyms.txt")
OUT = os.path.join(ROOT, "tests", "fixtures", "eval", "chair.json")
POPE_OUT = os.path.join(ROOT, "tests", "fixtures", "eval", "pope.json")

HAND = [
    "A man riding a motor bike next to a bus.",
    "Two baby elephants and an adult giraffe near the toilet seat.",
    "a passenger jet flies over the train track while people watch",
    "Wine glasses, forks and knives on a dining table. A cat sleeps on the couch!",
    "the dogs' owner holds a cell phone and a teddy bear; her children play frisbee",
    "A bow tie, a hot dog, and several donuts sit beside a laptop computer.",
    "An old woman's umbrellas lean on the benches by the fire hydrant.",
    "skis and snowboards stacked against the minibuses",
    "a toilet and a seat",
    "",
]


class Chair:
    def __init__(self):
        synonyms = [s.strip().split(", ") for s in open(SYNONYMS).readlines()]
        self.objects = []
        self.inverse = {}
        for syn in synonyms:
            self.objects.extend(syn)
            for s in syn:
                self.inverse[s] = syn[0]
        double = ["motor bike", "motor cycle", "air plane", "traffic light", "street light",
                  "traffic signal", "stop light", "fire hydrant", "stop sign", "parking meter",
                  "suit case", "sports ball", "baseball bat", "baseball glove", "tennis racket",
                  "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear",
                  "hair drier", "potted plant", "bow tie", "laptop computer", "stove top oven",
                  "hot dog", "teddy bear", "home plate", "train track"]
        animals = ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
                   "giraffe", "animal", "cub"]
        self.double = {w: w for w in double}
        for a in animals:
            self.double["baby %s" % a] = a
            self.double["adult %s" % a] = a
        for v in ["jet", "train"]:
            self.double["passenger %s" % v] = v
        self.double["bow tie"] = "tie"
        self.double["toilet seat"] = "toilet"
        self.double["wine glas"] = "wine glass"
        self.tok = NLTKWordTokenizer()

    def tokenize(self, text):
        out = []
        for sent in re.split(r"(?<=[.!?])\s+", text):
            out.extend(self.tok.tokenize(sent))
        return out

    def caption_to_words(self, caption):
        words = [singularize(w) for w in self.tokenize(caption.lower())]
        i, joined = 0, []
        while i < len(words):
            pair = " ".join(words[i:i + 2])
            if pair in self.double:
                joined.append(self.double[pair])
                i += 2
            else:
                joined.append(words[i])
                i += 1
        words = joined
        if ("toilet" in words) & ("seat" in words):
            words = [w for w in words if w != "seat"]
        objects = set(self.objects)
        words = [w for w in words if w in objects]
        return words, [self.inverse[w] for w in words]


def main():
    chair = Chair()
    caps = json.load(open(os.path.join(COCO, "captions_train2017.json")))
    inst = json.load(open(os.path.join(COCO, "instances_train2017.json")))
    files = {im["id"]: im["file_name"] for im in caps["images"]}
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    objects = {f: set() for f in files.values()}
    for a in inst["annotations"]:
        objects[files[a["image_id"]]].add(chair.inverse[cats[a["category_id"]]])
    refs = {f: [] for f in files.values()}
    for a in caps["annotations"]:
        refs[files[a["image_id"]]].append(a["caption"])
        objects[files[a["image_id"]]].update(chair.caption_to_words(a["caption"])[1])

    vocab = set()
    for line in open(SYNONYMS):
        for name in line.strip().split(", "):
            for w in name.split():
                vocab.update([w, pluralize(w)])
    for rs in refs.values():
        for r in rs:
            vocab.update(chair.tokenize(r.lower()))
    singular = [[w, singularize(w)] for w in sorted(vocab)]

    order = sorted(files.values())
    cases = []
    for i, f in enumerate(order):
        wrong = order[(i + 1) % len(order)]
        for r in refs[f][:2]:
            cases.append({"caption": r, "image": wrong})
    for j, h in enumerate(HAND):
        cases.append({"caption": h, "image": order[j]})
    n_words = n_bad = n_bad_caps = 0
    for c in cases:
        words, nodes = chair.caption_to_words(c["caption"])
        bad = [[w, n] for w, n in zip(words, nodes) if n not in objects[c["image"]]]
        c["mentions"] = [[w, n] for w, n in zip(words, nodes)]
        c["hallucinated"] = bad
        n_words += len(words)
        n_bad += len(bad)
        n_bad_caps += bool(bad)
    totals = {"chair_i": n_bad / n_words, "chair_s": n_bad_caps / len(cases), "mentions": n_words,
              "hallucinated_mentions": n_bad, "hallucinated_captions": n_bad_caps}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as fh:
        json.dump({"singular": singular, "objects": {f: sorted(o) for f, o in objects.items()},
                   "cases": cases, "totals": totals}, fh, ensure_ascii=False, indent=0)
    print(f"{OUT}: {len(singular)} words, {len(cases)} captions, CHAIR_i {totals['chair_i']:.4f} "
          f"CHAIR_s {totals['chair_s']:.4f}")

    pope_fixture({f: sorted({chair.inverse[cats[a["category_id"]]] for a in inst["annotations"]
                             if files[a["image_id"]] == f}) for f in order})


def pope_build(images, sample_num, strategy):
    """POPE's `pope()` over [(name, objects)], the fallbacks recorded as None."""
    counts = {}
    for _, objs in images:
        for o in objs:
            counts[o] = counts.get(o, 0) + 1
    sorted_objects = sorted(counts.items(), key=lambda x: x[1], reverse=True)
    co = {}
    for _, objs in images:
        for o in objs:
            co.setdefault(o, {})
            for other in objs:
                if o != other:
                    co[o][other] = co[o].get(other, 0) + 1
    sorted_co = {o: [k for k, _ in sorted(v.items(), key=lambda x: x[1], reverse=True)]
                 for o, v in co.items()}
    out = []
    for idx, objs in images:
        history = []
        for i in range(sample_num):
            pos = objs[i]
            history.append(pos)
            out.append([idx, pos, "yes"])
            ranked = [o for o, _ in sorted_objects] if strategy == "popular" else sorted_co[pos]
            chosen = next((o for o in ranked if o not in history and o not in objs), None)
            if chosen is not None:
                history.append(chosen)
            out.append([idx, chosen, "no"])
    return out


def pope_read(text):
    if text.find(".") != -1:
        text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_fixture(objects):
    names = sorted(objects)
    images = [(i, objects[n]) for i, n in enumerate(names) if len(objects[n]) >= 3]
    questions = {s: pope_build(images, 3, s) for s in ["popular", "adversarial"]}
    answers = ["Yes, there is a dog.", "No, there is no dog.", "There is not a cat here",
               "Nope. no", "NO", "no.", "yes", "No", "I see no, well, maybe. Yes", "Yes. No.",
               "a man, not a woman", "The image shows a cat,no doubt.", ""]
    labels = ["yes", "no", "no", "yes", "no", "no", "yes", "yes", "no", "yes", "no", "yes", "no"]
    read = [pope_read(a) for a in answers]
    pred = [1 if r == "yes" else 0 for r in read]
    lab = [1 if x == "yes" else 0 for x in labels]
    tp = sum(p == 1 and l == 1 for p, l in zip(pred, lab))
    fp = sum(p == 1 and l == 0 for p, l in zip(pred, lab))
    tn = sum(p == 0 and l == 0 for p, l in zip(pred, lab))
    fn = sum(p == 0 and l == 1 for p, l in zip(pred, lab))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    scores = {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": precision, "recall": recall,
              "f1": 2 * precision * recall / (precision + recall), "accuracy": (tp + tn) / len(pred),
              "yes_ratio": pred.count(1) / len(pred)}
    with open(POPE_OUT, "w") as fh:
        json.dump({"images": [objects[n] for n in names], "questions": questions,
                   "answers": {"text": answers, "read": read, "labels": labels,
                               "scores": scores}}, fh, indent=0)
    print(f"{POPE_OUT}: {len(images)} images polled, "
          + ", ".join(f"{k} {len(v)} questions" for k, v in questions.items()))


if __name__ == "__main__":
    main()
