#!/usr/bin/env bash
# Fed-SB's initialisation, measured on the README demo's tiny model and non-IID data (4 clients, 5 rounds of 10 local
# steps): held-out loss by round and bytes each client sent (during the initialisation, and per round) for fed-sb
# initialised by sketch, dense and random, at its operating point — the largest rank the model's narrowest adapted
# module allows (v_proj is 32×64), whose r² per module still uploads less than FedIT's r·(m + n) at rank 8 — beside
# fedit, flora and lora-fair at rank 8. Every configuration runs with each coordinator seed in SEEDS (cohorts,
# initial factors, the sketch's Ω); the table is the mean over seeds, with the spread of round 5.
#   [SEEDS="1 2 3 4 5"] fed_sb_init.sh [FED_SB_RANK (32)] [INIT_LR (1e-2)] [R_LR (0.05)] [INIT_EXAMPLES (64)]
# Then fed_sb_subspace.py: how much of FedIT's learned update each fed-sb run's frozen B, A hold.
# Needs a build (deploy/build.sh). Results in out/fed-sb-init/.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=build/bin mode=llm
rank=${1:-32} init_lr=${2:-1e-2} r_lr=${3:-0.05} examples=${4:-64}
w=out/fed-sb-init; rm -rf $w; mkdir -p $w
source tests/bench/federation.sh
make_tiny_llm
common=(--rounds 5 --base-model-dir $w/model --eval-data $w/data/test.jsonl
        --target-modules q_proj,v_proj,up_proj,down_proj --local-steps 10)
client=(--workload llm --model $w/model --batch 8 --eval-examples 16 --threads 1)
seeds=(${SEEDS:-1 2 3 4 5})
for seed in "${seeds[@]}"; do
  export SEED=$seed
  for method in fedit flora lora-fair; do
    run $method $method-s$seed "${common[@]}" --rank 8 --lora-alpha 16 --learning-rate 0.01 -- "${client[@]}"
  done
  for init in sketch dense random; do
    run fed-sb fed-sb-$init-s$seed "${common[@]}" --rank $rank --lora-alpha $rank --learning-rate $r_lr \
      --fed-sb-init $init --fed-sb-init-lr $init_lr --fed-sb-init-examples $examples -- "${client[@]}"
  done
done
echo "fed-sb rank $rank (alpha = rank), R learning rate $r_lr, init lr $init_lr over $examples records per client;"
echo "the others rank 8, alpha 16, learning rate 0.01. Held-out loss of the global model after each round, mean over"
echo "coordinator seeds ${seeds[*]}; the last column is round 5's min–max over them."
python3 - $w "${seeds[*]}" fedit flora lora-fair fed-sb-sketch fed-sb-dense fed-sb-random <<'PY'
import json, statistics, sys
w, seeds = sys.argv[1], sys.argv[2].split()
print('%-14s %-36s %-15s %13s %15s' % ('run', 'held-out loss, rounds 1-5', 'round 5 range', 'init B/client',
                                       'B/client/round'))
for tag in sys.argv[3:]:
    losses, init, up = [], [], []
    for s in seeds:
        rows = [json.loads(l) for l in open(f'{w}/{tag}-s{s}/metrics.jsonl')]
        losses.append([r['eval_loss'] for r in rows])
        v0 = json.load(open(f'{w}/{tag}-s{s}/ledger.json'))['versions'][0].get('record') or {}
        init += list(v0.get('init_bytes_up', {}).values())
        up += [b for r in rows for b in r['bytes_up'].values()]
    mean = [statistics.mean(col) for col in zip(*losses)]
    last = [l[-1] for l in losses]
    print('%-14s %-36s %-15s %13s %15.0f' % (tag, ' '.join('%.4f' % x for x in mean),
          '%.4f-%.4f' % (min(last), max(last)), '%.0f' % statistics.mean(init) if init else '-',
          statistics.mean(up)))
PY
echo
echo "Share of FedIT's final update (rank 8) inside each fed-sb run's frozen B, A, mean over seeds:"
python3 tests/bench/fed_sb_subspace.py $w "${seeds[*]}"
