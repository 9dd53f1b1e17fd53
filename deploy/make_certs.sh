#!/usr/bin/env bash
# Makes the certificates of a fedlora run with openssl: a CA, a server certificate for localhost, 127.0.0.1 and the
# compose service name "coordinator" (plus any names given with SERVER_NAMES="a b"), and N client certificates whose
# common names (client-1 … client-N) are the clients' identities.
#   usage: deploy/make_certs.sh OUT_DIR [N]
set -euo pipefail
out=${1:?usage: make_certs.sh OUT_DIR [N]}
n=${2:-4}
mkdir -p "$out"
cd "$out"
days=825
if [[ ! -f ca.pem ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
    -subj "/CN=fedlora run CA" -keyout ca.key -out ca.pem 2>/dev/null
fi
sign() {  # name, subject CN, extensions
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days "$days" -out "$1.pem" \
    -extfile <(printf '%s\n' "$3") 2>/dev/null
  rm -f "$1.csr"
  chmod 600 "$1.key"
}
sans="DNS:localhost,IP:127.0.0.1,DNS:coordinator"
for name in ${SERVER_NAMES:-}; do sans+=",DNS:$name"; done
[[ -f server.pem ]] || sign server coordinator "subjectAltName=$sans
extendedKeyUsage=serverAuth"
for i in $(seq 1 "$n"); do
  [[ -f client-$i.pem ]] || sign "client-$i" "client-$i" "extendedKeyUsage=clientAuth"
done
chmod 600 ca.key
# In containers the certificates are made as root for a service user: CERT_OWNER=uid hands them over.
if [[ -n ${CERT_OWNER:-} ]]; then chown -R "$CERT_OWNER" .; fi
echo "certificates in $out: ca.pem, server.pem/.key, client-1..$n.pem/.key"
