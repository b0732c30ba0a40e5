#!/usr/bin/env python3
"""SSIM and PSNR as scikit-image computes them, for crates/eval/src/vq.rs's tests:

    PYTHONPATH=/tmp/skpy python3 scripts/gen_vq_metric_fixtures.py
    # writes tests/fixtures/eval/vq_metrics.json

Two 40 x 48 RGB images from integer formulas both sides restate (a gradient pattern, and
it with a structured disturbance), and the images' SSIM by
`structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=255, channel_axis=2)` and PSNR by `peak_signal_noise_ratio(data_range=255)`.
"""
import json
import os

import numpy as np
import skimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 40, 48
y, x, c = np.meshgrid(np.arange(H), np.arange(W), np.arange(3), indexing="ij")
a = ((x * 7 + y * 13 + c * 50) % 256).astype(np.uint8)
b = np.clip(a.astype(int) + ((x * y * (c + 1)) % 31) - 15, 0, 255).astype(np.uint8)
out = {
    "skimage": skimage.__version__, "height": H, "width": W,
    "ssim": float(structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=255,
                                        channel_axis=2)),
    "psnr": float(peak_signal_noise_ratio(a, b, data_range=255)),
}
json.dump(out, open(os.path.join(ROOT, "tests/fixtures/eval/vq_metrics.json"), "w"), indent=1)
print(out)
