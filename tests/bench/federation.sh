# Sourced by the benchmark scripts: federations on loopback (plaintext, one machine) with 4 clients.
# Expects B (the programs' directory), w (a work directory) and mode (llm or regression).

# run METHOD TAG SERVER_ARGS... -- CLIENT_ARGS... : a coordinator (--seed $SEED, default 1: cohorts, initial
# factors, sketches) and 4 clients (client i gets --data-seed i and,
# for llm, its own data file); waits for all of them. State in $w/TAG, logs in $w/TAG*.log.
run() {
  local method=$1 tag=$2; shift 2
  local server=() client=()
  while [[ $1 != -- ]]; do server+=("$1"); shift; done; shift
  client=("$@")
  local st=$w/$tag; rm -f $w/port
  $B/fedlora-server --insecure --method $method --min-clients 4 --state-dir $st --listen 127.0.0.1:0 \
    --port-file $w/port --linger-s 1 --seed ${SEED:-1} "${server[@]}" 2>$st.log &
  local srv=$! pids=()
  for _ in $(seq 100); do [[ -s $w/port ]] && break; sleep 0.05; done
  for i in 1 2 3 4; do
    local own=(--data-seed $i)
    [[ $mode == llm ]] && own=(--data $w/data/client-$i.jsonl)
    $B/fedlora-client --insecure --id c$i --coordinator localhost:$(cat $w/port) "${own[@]}" "${client[@]}" \
      ${DP:+--privacy-ledger $st-ledger-$i.json} 2>$st-c$i.log &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait $p; done
  wait $srv
}

# The README demo's tiny Llama model and its non-IID data (4 clients × 160 records, 60 held out): $w/model, $w/data.
make_tiny_llm() {
  $B/fedlora make-data --out $w/data --clients 4 --records 160 --test-records 60 --alpha 0.5 --seed 1 >/dev/null
  cat $w/data/client-*.jsonl > $w/corpus.jsonl
  $B/fedlora init-model --preset tiny --seed 1 --init-std 0.1 --merges 200 --tokenizer-corpus $w/corpus.jsonl \
    --out $w/model >/dev/null
}
