#!/usr/bin/env bash
# Fed-SB's initialisation, measured on the README demo's tiny model and non-IID data (4 clients, 5 rounds of 10 local
# steps): held-out loss by round and bytes each client sent (during the initialisation, and per round) for fed-sb
# initialised by sketch, dense and random, at a rank whose per-round upload stays below FedIT's, beside fedit,
# flora and lora-fair at rank 8.
#   fed_sb_init.sh [FED_SB_RANK (24)] [INIT_LR (1e-3)] [R_LR (0.1)] [INIT_EXAMPLES (64)]
# Needs a build (deploy/build.sh). Results in out/fed-sb-init/.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=build/bin mode=llm
rank=${1:-24} init_lr=${2:-1e-3} r_lr=${3:-0.1} examples=${4:-64}
w=out/fed-sb-init; rm -rf $w; mkdir -p $w
source tests/bench/federation.sh
make_tiny_llm
common=(--rounds 5 --base-model-dir $w/model --eval-data $w/data/test.jsonl
        --target-modules q_proj,v_proj,up_proj,down_proj --local-steps 10)
client=(--workload llm --model $w/model --batch 8 --eval-examples 16 --threads 1)
for method in fedit flora lora-fair; do
  run $method $method "${common[@]}" --rank 8 --lora-alpha 16 --learning-rate 0.01 -- "${client[@]}"
done
for init in sketch dense random; do
  run fed-sb fed-sb-$init "${common[@]}" --rank $rank --lora-alpha $rank --learning-rate $r_lr \
    --fed-sb-init $init --fed-sb-init-lr $init_lr --fed-sb-init-examples $examples -- "${client[@]}"
done
echo "fed-sb rank $rank (alpha = rank), R learning rate $r_lr, init lr $init_lr over $examples records per client;"
echo "the others rank 8, alpha 16, learning rate 0.01. Held-out loss of the global model after each round."
python3 - $w fedit flora lora-fair fed-sb-sketch fed-sb-dense fed-sb-random <<'PY'
import json, sys
w = sys.argv[1]
print('%-14s %-44s %14s %16s' % ('run', 'held-out loss, rounds 1-5', 'init B/client', 'B/client/round'))
for tag in sys.argv[2:]:
    rows = [json.loads(l) for l in open(f'{w}/{tag}/metrics.jsonl')]
    v0 = json.load(open(f'{w}/{tag}/ledger.json'))['versions'][0].get('record') or {}
    init = v0.get('init_bytes_up', {})
    up = [b for r in rows for b in r['bytes_up'].values()]
    print('%-14s %-44s %14s %16.0f' % (tag, ' '.join('%.4f' % r['eval_loss'] for r in rows),
          '%.0f' % (sum(init.values()) / len(init)) if init else '-', sum(up) / len(up)))
PY
