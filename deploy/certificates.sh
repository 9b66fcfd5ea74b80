#!/usr/bin/env bash
# Self-signed CA and a SuperLink certificate for 127.0.0.1/localhost (the loopback deployment),
# plus an unrelated "rogue" CA that a node must not be able to use. Usage: deploy/certificates.sh <dir> [nodes]
set -euo pipefail
dir=${1:-certificates}
mkdir -p "$dir"
cd "$dir"
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=alignfedrec-ca" -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
printf "subjectAltName=DNS:localhost,IP:127.0.0.1\n" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -extfile server.ext \
  -out server.pem 2>/dev/null
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=rogue-ca" -keyout rogue-ca.key -out rogue-ca.crt 2>/dev/null
rm -f server.csr server.ext ca.srl
echo "wrote $(pwd): ca.crt, server.pem, server.key (SuperLink) and rogue-ca.crt (must be refused)"
# SuperNode authentication: one ECDSA P-384 key pair per node (registered with `flwr supernode register`)
# and one that is never registered
for name in $(seq -f "node%g" 0 $(( ${2:-2} - 1 ))) rogue-node; do
  rm -f "$name" "$name.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "" -f "$name"
done
echo "wrote $(pwd): node*/node*.pub (SuperNode keys) and rogue-node (never registered)"
