#!/usr/bin/env bash
# The main job: sets everything up, then runs a small federation on this machine. A coordinator (fedlora-server)
# and 4 clients (fedlora-client) run as separate processes over mutual TLS on loopback, with certificates made by
# deploy/make_certs.sh. The clients fine-tune LoRA adapters of a tiny Llama-architecture model (`fedlora init-model
# --preset tiny`: random weights, a byte-level BPE tokenizer learned from the data) on a synthetic instruction
# dataset split non-IID across them (`fedlora make-data`: six task categories, Dirichlet α = 0.5 per client). The
# coordinator evaluates the global model on held-out records after every round (loss, and the exact-match accuracy
# of its greedy answers). Every method runs in turn; the summary table, with the held-out loss and accuracy round by
# round, is printed and written to out/demo/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/build.sh
bin=build/bin
work=out/demo
rm -rf "$work"
mkdir -p "$work"
bash deploy/make_certs.sh "$work/certs" 4 >/dev/null
certs=$work/certs
rounds=${ROUNDS:-5}

"$bin/fedlora" make-data --out "$work/data" --clients 4 --records 160 --test-records 60 --alpha 0.5 --seed 1 \
  >"$work/data.txt"
cat "$work"/data/client-*.jsonl >"$work/corpus.jsonl"
# Wider than transformers' 0.02 initialisation, so the frozen random model leaves LoRA room to learn.
"$bin/fedlora" init-model --preset tiny --seed 1 --init-std 0.1 --merges 200 \
  --tokenizer-corpus "$work/corpus.jsonl" --out "$work/model" >/dev/null

for method in fedit flora lora-fair fed-sb; do
  state=$work/$method
  # Fed-SB at its operating point: only R is trained (r² numbers per module), so its rank is the largest the
  # narrowest module allows (v_proj is 32×64; 4·32² per layer still uploads less than FedIT's 8·(m+n) sums), with
  # alpha = r as LoRA-SB, a larger step, and B, A, R0 from the clients' gradient (a federated sketch before round 1;
  # tests/bench/fed_sb_init.sh measured these settings).
  lr=0.01 adapter=(--rank 8 --lora-alpha 16)
  [[ $method == fed-sb ]] && lr=0.05 adapter=(--rank 32 --lora-alpha 32 --fed-sb-init-lr 1e-2)
  rm -f "$work/$method.port"
  "$bin/fedlora-server" --method "$method" --rounds "$rounds" --min-clients 4 --state-dir "$state" \
    --listen 127.0.0.1:0 --port-file "$work/$method.port" --tls-cert "$certs/server.pem" \
    --tls-key "$certs/server.key" --client-ca "$certs/ca.pem" \
    --allowed-clients client-1,client-2,client-3,client-4 --base-model-dir "$work/model" \
    --eval-data "$work/data/test.jsonl" --eval-accuracy --eval-max-new-tokens 12 --target-modules q_proj,v_proj,up_proj,down_proj "${adapter[@]}" \
    --local-steps 10 --learning-rate "$lr" --linger-s 1 --seed 1 2>"$work/$method-server.log" &
  server=$!
  for _ in $(seq 100); do [[ -s $work/$method.port ]] && break; sleep 0.05; done
  port=$(cat "$work/$method.port")
  clients=()
  for i in 1 2 3 4; do
    "$bin/fedlora-client" --coordinator "localhost:$port" --ca "$certs/ca.pem" --cert "$certs/client-$i.pem" \
      --key "$certs/client-$i.key" --workload llm --model "$work/model" --data "$work/data/client-$i.jsonl" \
      --batch 8 --eval-examples 32 --threads 1 2>"$work/$method-client-$i.log" &
    clients+=($!)
  done
  for pid in "${clients[@]}"; do wait "$pid"; done
  wait "$server"
  echo "$method: $rounds rounds done (logs: $work/$method-*.log)"
done

echo
echo "fedlora federation on loopback, mutual TLS: 4 clients fine-tune LoRA (rank 8 on q, v, up, down; fed-sb rank 32"
echo "from the clients' gradient) of a tiny Llama model on their own non-IID instruction data (160 records each;"
echo "categories per client in $work/data.txt), $rounds rounds per method, 10 local steps per round. Held-out loss: the"
echo "global model on 60 records no client has."
echo
"$bin/fedlora" summary --out "$work/summary.txt" "$work/fedit" "$work/flora" "$work/lora-fair" "$work/fed-sb"
echo "(written to $work/summary.txt; merged models in $work/<method>/export/merged)"
