#!/bin/sh
# Validate both nginx configs with `nginx -t`, without root paths or ports:
# the TLS one gets a throwaway self-signed certificate, temp log paths and
# loopback addresses for compose's replicas (names only compose resolves).
# Usage: deploy/nginx/check.sh  (needs nginx and openssl on PATH)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=localhost" \
    -keyout "$tmp/chathub.key" -out "$tmp/chathub.crt" 2>/dev/null
sed -e "s#/etc/nginx/tls/#$tmp/#g" \
    -e "s#/var/log/nginx/#$tmp/#g" \
    -e "s#/run/nginx.pid#$tmp/nginx.pid#" \
    -e "s#chathub-\([0-9]\):8000#127.0.0.1:800\1#" \
    "$here/nginx.conf" > "$tmp/nginx.conf"
nginx -t -q -p "$tmp" -c "$tmp/nginx.conf"
echo "nginx.conf: ok"

mkdir -p "$tmp/local"
nginx -t -q -p "$tmp/local" -c "$here/nginx-local.conf"
echo "nginx-local.conf: ok"
