#!/usr/bin/env bash
# Install the Python packages the tests run (PyPI: for `clasp serve`, the
# official `openai` package and `jsonschema` for the OpenAPI check; for ONNX
# export, `onnxruntime` and `numpy`; `webdataset` to write and read shards; `autofaiss`
# (with faiss-cpu, pyarrow, pandas) to index clip-retrieval's layout) into a
# cache outside the repository; print the folder to put on PYTHONPATH. A
# second run installs nothing. The folder is moved into place only when
# complete, and a new package list makes a new folder.
set -euo pipefail

packages=(openai jsonschema onnxruntime numpy webdataset autofaiss faiss-cpu "pyarrow<20" pandas)
root="${CLASP_MODELS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/clasp}"
dest="$root/py-clients"
want="${packages[*]}"

if [[ -f "$dest/.complete" && "$(cat "$dest/.complete")" == "$want" ]]; then
    echo "$dest"
    exit 0
fi
mkdir -p "$root"
tmp="$(mktemp -d "$root/.py-clients.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "installing ${want} from PyPI into $dest ..." >&2
python3 -m pip install --quiet --disable-pip-version-check --target "$tmp" "${packages[@]}" >&2
echo "$want" > "$tmp/.complete"
rm -rf "$dest"
mv "$tmp" "$dest"
echo "$dest"
