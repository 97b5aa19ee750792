#!/bin/sh
# Make a private CA and a broker certificate for mosquitto's TLS listener (8883).
#
#   broker/make-certs.sh OUTDIR BROKER_HOSTNAME [BROKER_IP]
#
# Writes OUTDIR/ca.crt (give this to every agent, the CLI and the collector as ca_file),
# OUTDIR/ca.key (keep it offline: whoever has it can impersonate the broker),
# OUTDIR/broker.crt and OUTDIR/broker.key (for mosquitto's certfile/keyfile).
# Clients check the broker's hostname, so BROKER_HOSTNAME (and BROKER_IP, if agents
# connect by address) must be what they put in their mqtts:// URL.
# Keys are EC P-256; the CA lives 10 years, the broker certificate 825 days.
set -eu

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 OUTDIR BROKER_HOSTNAME [BROKER_IP]" >&2
    exit 2
fi
out=$1
host=$2
ip=${3:-}

mkdir -p "$out"
cd "$out"
umask 077

if [ ! -f ca.key ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
        -keyout ca.key -out ca.crt -subj "/CN=mqfleet CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

san="DNS:$host"
if [ -n "$ip" ]; then
    san="$san,IP:$ip"
fi
cat > broker.ext <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EXT

openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout broker.key -out broker.csr -subj "/CN=$host" 2>/dev/null
openssl x509 -req -in broker.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
    -extfile broker.ext -out broker.crt 2>/dev/null
rm -f broker.csr broker.ext

# The CA certificate is public; the keys are not.
chmod 644 ca.crt broker.crt
chmod 600 ca.key broker.key
echo "wrote $out/ca.crt $out/broker.crt $out/broker.key (CA key: $out/ca.key)"
