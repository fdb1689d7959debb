#!/usr/bin/env bash
# Make a private CA, a server certificate for the embedding servers, a client certificate for
# trainers and TorchServe handlers (mutual TLS), a random read token and a random admin token.
#
#   deploy/production/make_certs.sh OUT_DIR [SERVER_NAME ...]
#
# SERVER_NAMEs go into the server certificate's subjectAltName: DNS names, or IP addresses
# (written as IP:10.0.0.5). Default: localhost and 127.0.0.1. Clients must connect by one of
# them (or set tls_server_name). Files written to OUT_DIR (private keys and the tokens mode 600):
#   ca.pem ca.key            the CA (keep ca.key offline; ca.pem goes to every server and client)
#   server.pem server.key    for the embedding servers (security.tls_cert_file / tls_key_file)
#   client.pem client.key    for trainers and handlers (serving.yml embedding_tls_cert_file / _key_file)
#   token                    the read token: Lookup, Info, Stats (security.token_file; serving.yml
#                            embedding_token_file): for TorchServe's workers
#   admin_token              the admin token: Dump, Load, SetOptimizer, PushGradients too
#                            (security.admin_token_file; CTRSERVE_EMBEDDING_ADMIN_TOKEN_FILE of trainers
#                            and of `ctrserve embedding-admin dump|load`): never give it to workers
# Certificates are valid for DAYS days (environment, default 365). Needs openssl >= 1.1.1.
set -euo pipefail

out=${1:?usage: make_certs.sh OUT_DIR [SERVER_NAME ...]}
shift
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(localhost IP:127.0.0.1)
days=${DAYS:-365}
mkdir -p "$out"
umask 077

san=""
for n in "${names[@]}"; do
  case "$n" in
    IP:*) san+="${san:+,}$n" ;;
    *)    san+="${san:+,}DNS:$n" ;;
  esac
done

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# The CA.
key "$out/ca.key"
openssl req -x509 -new -key "$out/ca.key" -out "$out/ca.pem" -days "$days" -subj "/CN=ctrserve embedding CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

# A leaf certificate signed by the CA: sign NAME CN EXTENSIONS
sign() {
  key "$out/$1.key"
  openssl req -new -key "$out/$1.key" -out "$out/$1.csr" -subj "/CN=$2"
  printf '%s\n' "$3" > "$out/$1.ext"
  openssl x509 -req -in "$out/$1.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" -CAcreateserial \
    -out "$out/$1.pem" -days "$days" -extfile "$out/$1.ext" 2>/dev/null
  rm -f "$out/$1.csr" "$out/$1.ext"
}
sign server "${names[0]#IP:}" "subjectAltName=$san
extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature"
sign client "ctrserve client" "extendedKeyUsage=clientAuth
keyUsage=critical,digitalSignature"
rm -f "$out/ca.srl"

# The read and the admin token: 32 random bytes each, hex (never the same).
openssl rand -hex 32 > "$out/token"
openssl rand -hex 32 > "$out/admin_token"
chmod 644 "$out/ca.pem" "$out/server.pem" "$out/client.pem"
echo "wrote $out: ca.pem server.pem server.key client.pem client.key token admin_token (server names: ${names[*]})"
