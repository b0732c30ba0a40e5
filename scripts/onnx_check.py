#!/usr/bin/env python3
"""ONNX Runtime on what `clasp export onnx` wrote, against clasp's own
embeddings of the same inputs (tests/onnx_export.rs writes them):

    python3 scripts/onnx_check.py EXPORT_DIR INPUTS.json

INPUTS.json: {"pixel_values": [...], "pixel_shape": [B, C, H, W] (or
[B, N, p*p*C] NaFlex patches, with "pixel_attention_mask" and
"spatial_shapes" for SigLIP 2),
"input_ids": [[...], ...] (one list per text: unpadded, or padded to the
context for SigLIP, which reads it whole), "image_embeds",
"text_embeds"}. The images run as one batch and each text alone, so both
the batch and the sequence axes vary. Prints {"image_max_abs",
"text_max_abs", "batch", "sequences"} as JSON.
Needs: pip install onnxruntime numpy
"""
import json
import os
import sys

import numpy as np
import onnxruntime as ort


def main():
    out_dir, inputs = sys.argv[1], json.load(open(sys.argv[2]))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    vision = ort.InferenceSession(os.path.join(out_dir, "vision.onnx"), opts, providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(os.path.join(out_dir, "text.onnx"), opts, providers=["CPUExecutionProvider"])
    px = np.asarray(inputs["pixel_values"], dtype=np.float32).reshape(inputs["pixel_shape"])
    feed = {"pixel_values": px}
    if "spatial_shapes" in {i.name for i in vision.get_inputs()}:  # SigLIP 2's NaFlex inputs
        feed["pixel_attention_mask"] = np.asarray(inputs["pixel_attention_mask"], dtype=np.int64)
        feed["spatial_shapes"] = np.asarray(inputs["spatial_shapes"], dtype=np.int64)
    img = vision.run(["image_embeds"], feed)[0]
    names = {i.name for i in text.get_inputs()}

    def embed_text(ids):
        feed = {"input_ids": np.asarray([ids], dtype=np.int64)}
        if "attention_mask" in names:  # BERT towers; each text runs alone, unpadded
            feed["attention_mask"] = np.ones_like(feed["input_ids"])
        return text.run(["text_embeds"], feed)[0][0]

    txt = np.stack([embed_text(ids) for ids in inputs["input_ids"]])
    print(json.dumps({
        "image_max_abs": float(np.abs(img - np.asarray(inputs["image_embeds"])).max()),
        "text_max_abs": float(np.abs(txt - np.asarray(inputs["text_embeds"])).max()),
        "batch": int(px.shape[0]),
        "sequences": sorted({len(i) for i in inputs["input_ids"]}),
    }))


if __name__ == "__main__":
    main()
