#!/usr/bin/env python3
"""Captioning-metric fixtures made by pycocoevalcap (the COCO caption evaluation code).

    pip install pycocoevalcap      # Java must be on PATH for its PTB tokenizer
    python3 scripts/gen_caption_fixtures.py

Writes tests/fixtures/caption/metrics.json:
  tokens  - raw strings and their PTBTokenizer output (-lowerCase, punctuation removed as
            pycocoevalcap removes it): every caption below plus hand-made hard cases;
  images  - 60 Flickr8k dev images: 4 reference captions each (captions 1-4), and a
            candidate: caption 0 of the same image for the first 40, of the next image for
            the last 20 (a wrong-photo control);
  scores  - Bleu(4) (option 'closest'), Rouge (ROUGE-L, beta 1.2) and Cider (CIDEr-D,
            sigma 6) on the tokenized captions: corpus values and per-image values.
"""

import json
import os

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "flickr8k")
OUT = os.path.join(ROOT, "tests", "fixtures", "caption")

HARD = [
    "A dog's toy, \"red\" (and blue) isn't here.", "Mr. Smith can't go to the U.S. today...",
    "A t-shirt -- cost $5.50 & more!", "and/or 3:30 p.m. it'll we're I'm you'd they've",
    "A   man\tin a hat; 'quoted' `back` end.", "Two dogs play in the snow .", "ELLIPSIS... end",
    "e-mail address: a@b.com", "100% cotton #1 fan", "a man 's dog", "the 90's", "A person's hands.",
    "dogs'", "o'clock", "x+y=z", "1/2 cup", "Don't!", "cannot", "gonna wanna", "\"Hello,\" he said.",
    "A boy [in red] {jumps}", "Is it?! Yes!!", "a dog won't stop", "St. Bernard dogs", "a 3-year-old girl",
    "WHAT A DAY", "end with comma,", "two.words", "a.b.c. test", "it costs 5$",
]


def main():
    os.makedirs(OUT, exist_ok=True)
    caps = {}
    with open(os.path.join(DATA, "Flickr8k.token.txt")) as f:
        for line in f:
            key, text = line.rstrip("\n").split("\t", 1)
            img, n = key.split("#")
            caps.setdefault(img, {})[int(n)] = text
    dev = sorted(l.strip() for l in open(os.path.join(DATA, "Flickr_8k.devImages.txt")) if l.strip())
    imgs = [i for i in dev if i in caps and len(caps[i]) == 5][:60]
    refs = {i: [caps[i][n] for n in range(1, 5)] for i in imgs}
    cands = {}
    for k, i in enumerate(imgs):
        src = i if k < 40 else imgs[(k + 1) % len(imgs)]
        cands[i] = caps[src][0]

    tok = PTBTokenizer()
    raw = HARD + [c for i in imgs for c in refs[i]] + [cands[i] for i in imgs]
    tokd = tok.tokenize({str(n): [{"caption": t}] for n, t in enumerate(raw)})
    tokens = [{"text": t, "ptb": tokd[str(n)][0]} for n, t in enumerate(raw)]

    gts = tok.tokenize({i: [{"caption": c} for c in refs[i]] for i in imgs})
    res = tok.tokenize({i: [{"caption": cands[i]}] for i in imgs})
    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_per = Rouge().compute_score(gts, res)
    cider, cider_per = Cider().compute_score(gts, res)
    out = {
        "tokens": tokens,
        "images": [{"image": i, "refs": refs[i], "candidate": cands[i]} for i in imgs],
        "scores": {
            "bleu": list(bleu), "rouge_l": float(rouge), "cider_d": float(cider),
            "per_image": {
                "bleu": [list(map(float, b)) for b in bleu_per],
                "rouge_l": [float(x) for x in rouge_per],
                "cider_d": [float(x) for x in cider_per],
            },
        },
    }
    with open(os.path.join(OUT, "metrics.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=0)
    print("BLEU", [round(b, 4) for b in bleu], "ROUGE-L", round(rouge, 4), "CIDEr-D", round(cider, 4))


if __name__ == "__main__":
    main()
