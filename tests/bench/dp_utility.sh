#!/usr/bin/env bash
# Utility at equal epsilon under DP-SGD: FedIT against Fed-SB, each without DP and with DP-SGD on every client.
#   dp_utility.sh llm SIGMA   the README demo's tiny model and non-IID data (4 clients, 5 rounds of 10 local steps,
#                             q = 8/160; FedIT r 8, Fed-SB r 32 from random B, A); prints the coordinator's
#                             held-out loss by round and the epsilon spent.
#                             σ for a budget: fedlora privacy --epsilon E --sample-rate 0.05 --steps 50
#   dp_utility.sh regression  the regression workload (4 non-IID clients, 2 layers 32x32, 200 examples each, 5 rounds
#                             of 20 steps, q = 0.1, clip 1) at epsilon ∞, 8 and 2: the global model's loss on the
#                             clients' data after round 5 (what round 6 starts from), FedIT r 4 against Fed-SB r 4
#                             (same rank) and r 16 (as many trained parameters: 16² = 4·(32+32)).
# Needs a build (deploy/build.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
B=build/bin
mode=${1:?usage: dp_utility.sh llm SIGMA | dp_utility.sh regression}
w=out/dp-utility-$mode; rm -rf $w; mkdir -p $w

source tests/bench/federation.sh

if [[ $mode == llm ]]; then
  sigma=${2:?usage: dp_utility.sh llm SIGMA}
  make_tiny_llm
  for method in fedit fed-sb; do
    # Fed-SB at the demo's operating point (rank 32, below FedIT's upload), from random B, A: the price of DP in
    # training alone (the initialisation's full-batch steps would cost more ε than the training; bench README).
    adapter=(--rank 8 --lora-alpha 16 --learning-rate 0.01)
    [[ $method == fed-sb ]] && adapter=(--rank 32 --lora-alpha 32 --learning-rate 0.1 --fed-sb-init random)
    for dp in off on; do
      extra=(); DP=
      [[ $dp == on ]] && { extra=(--dp-noise-multiplier $sigma --dp-clip 1); DP=1; }
      DP=$DP run $method $method-$dp --rounds 5 --base-model-dir $w/model --eval-data $w/data/test.jsonl \
        --target-modules q_proj,v_proj,up_proj,down_proj --local-steps 10 "${adapter[@]}" -- --workload llm --model $w/model --batch 8 --eval-examples 16 --threads 1 "${extra[@]}"
      python3 - "$w/$method-$dp" "$method" "$dp" <<'PY'
import json,sys
rows=[json.loads(l) for l in open(sys.argv[1]+'/metrics.jsonl')]
eps=rows[-1].get('dp_epsilon',{})
e=max(eps.values()) if eps else None
losses=' '.join('%.4f' % r['eval_loss'] for r in rows); print('%-7s DP-SGD %-3s held-out by round: %s  epsilon: %s' % (sys.argv[2], sys.argv[3], losses, e if e is None else round(e,3)))
PY
    done
  done
  exit 0
fi

# regression: σ for ε 8 and 2 over 5 rounds × 20 steps at q 0.1.
sigma() { $B/fedlora privacy --epsilon $1 --sample-rate 0.1 --steps 100 --delta 1e-5 --json | tail -1 |
          python3 -c 'import json,sys; print(json.load(sys.stdin)["noise_multiplier"])'; }
printf '%-10s %-12s %-8s %s\n' epsilon method sigma "loss after round 5 (start 1.9546)"
for eps in inf 8 2; do
  for spec in fedit:4 fed-sb:4 fed-sb:16; do
    method=${spec%:*} rank=${spec#*:} extra=() DP= s=-
    if [[ $eps != inf ]]; then s=$(sigma $eps); extra=(--dp-noise-multiplier $s --dp-clip 1 --dp-sample-rate 0.1); DP=1; fi
    [[ $method == fed-sb ]] && extra_server=(--fed-sb-init random) || extra_server=()  # as above: training alone
    tag=$method-r$rank-eps$eps
    DP=$DP run $method $tag --rounds 6 --rank $rank --lora-alpha $((2 * rank)) --local-steps 20 --learning-rate 0.3 \
      "${extra_server[@]}" -- --workload regression --examples 200 --layers 2 --in-features 32 --out-features 32 "${extra[@]}"
    python3 - "$w/$tag" "$eps" "$method r$rank" "$s" <<'PY'
import json,sys
rows=[json.loads(l) for l in open(sys.argv[1]+'/metrics.jsonl')]
spent=rows[4].get('dp_epsilon',{})   # after round 5: what round 6's starting loss was paid with
e='%.3f' % max(spent.values()) if spent else '∞'
print('%-10s %-12s %-8s %.4f   (spent %s)' % (sys.argv[2], sys.argv[3], sys.argv[4][:8], rows[5]['mean_loss_before'], e))
PY
  done
done
