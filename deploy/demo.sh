#!/usr/bin/env bash
# The main job: sets everything up, then runs a small federation on this machine. A coordinator (fedlora-server)
# and 4 clients (fedlora-client) run as separate processes over mutual TLS on loopback, with certificates made by
# deploy/make_certs.sh; each client fits LoRA factors to its own non-IID regression data. Every method runs in
# turn for a few rounds; the summary table is printed and written to out/demo/summary.txt.
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

for method in fedit flora lora-fair fed-sb; do
  state=$work/$method
  rm -f "$work/$method.port"
  "$bin/fedlora-server" --method "$method" --rounds "$rounds" --min-clients 4 --state-dir "$state" \
    --listen 127.0.0.1:0 --port-file "$work/$method.port" --tls-cert "$certs/server.pem" \
    --tls-key "$certs/server.key" --client-ca "$certs/ca.pem" \
    --allowed-clients client-1,client-2,client-3,client-4 --rank 4 --lora-alpha 8 --local-steps 25 \
    --learning-rate 0.1 --linger-s 1 --seed 1 2>"$work/$method-server.log" &
  server=$!
  for _ in $(seq 100); do [[ -s $work/$method.port ]] && break; sleep 0.05; done
  port=$(cat "$work/$method.port")
  clients=()
  for i in 1 2 3 4; do
    "$bin/fedlora-client" --coordinator "localhost:$port" --ca "$certs/ca.pem" --cert "$certs/client-$i.pem" \
      --key "$certs/client-$i.key" --data-seed "$i" --examples $((150 * i)) --layers 4 --in-features 64 \
      --out-features 64 2>"$work/$method-client-$i.log" &
    clients+=($!)
  done
  for pid in "${clients[@]}"; do wait "$pid"; done
  wait "$server"
  echo "$method: $rounds rounds done (logs: $work/$method-*.log)"
done

echo
echo "fedlora federation on loopback, mutual TLS: 4 clients (150/300/450/600 examples, non-IID regression,"
echo "4 layers of 64x64, LoRA rank 4), $rounds rounds per method. Global loss = the global model's loss on the"
echo "clients' data at the start of the first and of the last round."
echo
"$bin/fedlora" summary --out "$work/summary.txt" "$work/fedit" "$work/flora" "$work/lora-fair" "$work/fed-sb"
echo "(written to $work/summary.txt)"
