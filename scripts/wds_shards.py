#!/usr/bin/env python3
"""WebDataset shards as PyPI's `webdataset` package writes them, and what its own reader yields
from them, for tests/webdataset.rs:

    python3 scripts/wds_shards.py OUT_DIR PHOTO...

Writes OUT_DIR/shard-000000.tar, -000001.tar with `webdataset.ShardWriter` (4 samples a shard)
from the photos: each sample's `jpg` is the photo's bytes and its caption a `txt` member, or
for every third sample a `json` member with `caption`. Two damaged samples go in too: one whose
`jpg` is not an image (`bad-jpg`) and one with no caption (`no-caption`). Then
OUT_DIR/shard-000002.tar: a third shard cut in the middle of its second sample's image.

Prints JSON: for each sample `webdataset.WebDataset` yields from the first two shards (the
package's own grouping by key), its key, its image bytes in base64 and its caption.
"""
import base64
import io
import json
import os
import sys
import tarfile

import webdataset as wds


def main():
    out, photos = sys.argv[1], sys.argv[2:]
    os.makedirs(out, exist_ok=True)
    samples = []
    for i, p in enumerate(photos):
        data = open(p, "rb").read()
        caption = f"photo {i}: {os.path.basename(p)}"
        s = {"__key__": f"s{i:04d}", "jpg": data}
        if i % 3 == 2:
            s["json"] = {"caption": caption, "width": 0}
        else:
            s["txt"] = caption
        samples.append(s)
    samples.insert(2, {"__key__": "bad-jpg", "jpg": b"not a JPEG at all", "txt": "a broken image"})
    samples.insert(5, {"__key__": "no-caption", "jpg": open(photos[0], "rb").read()})
    pattern = os.path.join(out, "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=4, verbose=0) as w:
        for s in samples[:8]:
            w.write(s)
    # A third shard, cut short inside its second sample's image.
    third = os.path.join(out, "full.tar")
    with wds.TarWriter(third) as w:
        for s in samples[8:]:
            w.write(s)
    raw = open(third, "rb").read()
    with tarfile.open(third) as t:
        members = [m for m in t.getmembers() if m.name.endswith(".jpg")]
        cut = members[1].offset_data + members[1].size // 2
    open(os.path.join(out, "shard-000002.tar"), "wb").write(raw[:cut])
    os.remove(third)
    seen = []
    urls = [os.path.join(out, f"shard-{i:06d}.tar") for i in range(2)]
    for s in wds.WebDataset(urls, shardshuffle=False):
        cap = s["txt"].decode() if "txt" in s else (
            json.loads(s["json"])["caption"] if "json" in s else None)
        seen.append({"key": s["__key__"], "jpg": base64.b64encode(s["jpg"]).decode(),
                     "caption": cap})
    print(json.dumps({"samples": seen, "written": len(samples), "truncated_after":
                      [m.name for m in members[:1]]}))


if __name__ == "__main__":
    main()
