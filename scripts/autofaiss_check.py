#!/usr/bin/env python3
"""clip-retrieval's layout as its `index` step consumes it, for tests/webdataset.rs:

    python3 scripts/autofaiss_check.py EMBEDDINGS_DIR INDEX_DIR

Builds an inner-product index of EMBEDDINGS_DIR/img_emb with `autofaiss.build_index` (what
`clip-retrieval index` calls), reads EMBEDDINGS_DIR/metadata/*.parquet with pandas in the order
autofaiss reads the embedding files, and queries the index with every text_emb row. Prints JSON:
the metadata rows (image_path, caption), and for each text row the index's top-1 row and the
brute-force numpy top-1 over the same vectors.
"""
import glob
import json
import os
import sys

import numpy as np
import pandas as pd
from autofaiss import build_index


def main():
    emb, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    index, _ = build_index(embeddings=os.path.join(emb, "img_emb"),
                           index_path=os.path.join(out, "image.index"),
                           index_infos_path=os.path.join(out, "infos.json"),
                           metric_type="ip", max_index_query_time_ms=10,
                           max_index_memory_usage="1G", current_memory_available="2G",
                           verbose=40)
    parts = sorted(glob.glob(os.path.join(emb, "img_emb", "*.npy")))
    img = np.concatenate([np.load(p) for p in parts]).astype("float32")
    txt = np.concatenate([np.load(p) for p in
                          sorted(glob.glob(os.path.join(emb, "text_emb", "*.npy")))]).astype("float32")
    meta = pd.concat([pd.read_parquet(p) for p in
                      sorted(glob.glob(os.path.join(emb, "metadata", "*.parquet")))])
    _, found = index.search(txt, 1)
    print(json.dumps({
        "rows": meta[["image_path", "caption"]].values.tolist(),
        "dtype": str(np.load(parts[0]).dtype),
        "index_top1": found[:, 0].tolist(),
        "numpy_top1": (txt @ img.T).argmax(1).tolist(),
        "first_row": img[0].tolist(),
    }))


if __name__ == "__main__":
    main()
