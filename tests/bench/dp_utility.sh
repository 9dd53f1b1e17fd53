#!/usr/bin/env bash
# DP-SGD utility at equal epsilon: FedIT against Fed-SB, each with and without DP-SGD, on the README demo's tiny
# model and non-IID data (4 clients, 5 rounds of 10 local steps, q = 8/160). Prints the held-out loss by round and
# the epsilon each DP run spent. Needs a build (deploy/build.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
B=build/bin
w=out/dp-utility; rm -rf $w; mkdir -p $w
$B/fedlora make-data --out $w/data --clients 4 --records 160 --test-records 60 --alpha 0.5 --seed 1 >/dev/null
cat $w/data/client-*.jsonl > $w/corpus.jsonl
$B/fedlora init-model --preset tiny --seed 1 --init-std 0.1 --merges 200 --tokenizer-corpus $w/corpus.jsonl --out $w/model >/dev/null
sigma=${1:?usage: dp_utility.sh NOISE_MULTIPLIER (fedlora privacy --epsilon E --sample-rate 0.05 --steps 50 gives it)}
for method in fedit fed-sb; do
  lr=0.01; [[ $method == fed-sb ]] && lr=0.1
  for dp in off on; do
    st=$w/$method-$dp; rm -f $w/port
    $B/fedlora-server --insecure --method $method --rounds 5 --min-clients 4 --state-dir $st --listen 127.0.0.1:0 \
      --port-file $w/port --base-model-dir $w/model --eval-data $w/data/test.jsonl \
      --target-modules q_proj,v_proj,up_proj,down_proj --rank 8 --lora-alpha 16 --local-steps 10 \
      --learning-rate $lr --linger-s 1 --seed 1 2>$st.log &
    srv=$!
    for _ in $(seq 100); do [[ -s $w/port ]] && break; sleep 0.05; done
    pids=()
    for i in 1 2 3 4; do
      extra=()
      [[ $dp == on ]] && extra=(--dp-noise-multiplier $sigma --dp-clip 1 --privacy-ledger $st-ledger-$i.json)
      $B/fedlora-client --insecure --id c$i --coordinator localhost:$(cat $w/port) --workload llm --model $w/model \
        --data $w/data/client-$i.jsonl --batch 8 --eval-examples 16 --threads 1 "${extra[@]}" 2>$st-c$i.log &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait $p; done
    wait $srv
    python3 - "$st" "$method" "$dp" <<'PY'
import json,sys
rows=[json.loads(l) for l in open(sys.argv[1]+'/metrics.jsonl')]
eps=rows[-1].get('dp_epsilon',{})
e=max(eps.values()) if eps else None
losses=' '.join('%.4f' % r['eval_loss'] for r in rows); print('%-7s DP-SGD %-3s held-out by round: %s  epsilon: %s' % (sys.argv[2], sys.argv[3], losses, e if e is None else round(e,3)))
PY
  done
done
