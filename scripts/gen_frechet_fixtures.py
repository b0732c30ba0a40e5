#!/usr/bin/env python3
"""The Fréchet distance as pytorch-fid computes it (`calculate_frechet_distance`: numpy means,
`np.cov` with rowvar False, `scipy.linalg.sqrtm` of the covariances' product, its real part), for
crates/eval/src/frechet.rs's tests:

    pip install --target /tmp/scipy scipy numpy
    PYTHONPATH=/tmp/scipy python3 scripts/gen_frechet_fixtures.py
    # writes tests/fixtures/eval/frechet.json

Three cases of seeded Gaussian features stored with the answer: fewer features than rows, more
features than rows (rank-deficient covariances, as 100 photos on a 1280-wide tower are), and
two sets that differ only in spread.
"""
import json
import os

import numpy as np
import scipy
from scipy import linalg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fd(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


rng = np.random.default_rng(7)
cases = []
for name, na, nb, d, scale in [("narrow", 40, 30, 6, 1.0), ("wide", 9, 12, 40, 1.0),
                                ("spread", 25, 25, 10, 2.0)]:
    a = rng.normal(size=(na, d)).astype(np.float32)
    b = (rng.normal(size=(nb, d)) * scale + (0.3 if name != "spread" else 0.0)).astype(np.float32)
    cases.append({"name": name, "a": a.tolist(), "b": b.tolist(),
                  "fd": fd(a.astype(np.float64), b.astype(np.float64))})
out = {"scipy": scipy.__version__, "cases": cases}
path = os.path.join(ROOT, "tests/fixtures/eval/frechet.json")
with open(path, "w") as f:
    json.dump(out, f)
print(path, [round(c["fd"], 6) for c in cases])
