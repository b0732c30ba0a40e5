#!/usr/bin/env bash
# Install the official `openai` Python package (PyPI) into a cache outside
# the repository, for the client test of `clasp serve --vlm`; print the
# folder to put on PYTHONPATH. A second run installs nothing. The folder is
# moved into place only when complete.
set -euo pipefail

root="${CLASP_MODELS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/clasp}"
dest="$root/py-openai"

if [[ -f "$dest/.complete" ]]; then
    echo "$dest"
    exit 0
fi
mkdir -p "$root"
tmp="$(mktemp -d "$root/.openai.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "installing openai from PyPI into $dest ..." >&2
python3 -m pip install --quiet --disable-pip-version-check --target "$tmp" openai >&2
touch "$tmp/.complete"
rm -rf "$dest"
mv "$tmp" "$dest"
echo "$dest"
