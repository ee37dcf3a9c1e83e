# Shared by the provisioning scripts (sourced from /vagrant/provision inside a node).

LAB_CA=/vagrant/.lab/tls
TLS=/etc/coldferry/tls

# wait_http URL TOKEN_FILE [TRIES]: GET URL (https, its certificate checked against the lab CA
# in $TLS/ca.pem) with the bearer token in TOKEN_FILE until it answers 2xx, two seconds
# apart; fails after TRIES (default 120) attempts.
wait_http() {
    local url=$1 token_file=$2 tries=${3:-120} i
    for ((i = 0; i < tries; i++)); do
        python3 - "$url" "$token_file" "$TLS/ca.pem" 2>/dev/null <<'PY' && return 0
import ssl, sys, urllib.request
token = open(sys.argv[2]).read().strip()
req = urllib.request.Request(sys.argv[1], headers={"Authorization": f"Bearer {token}"})
urllib.request.urlopen(req, timeout=5, context=ssl.create_default_context(cafile=sys.argv[3]))
PY
        sleep 2
    done
    return 1
}

# start_service UNIT URL TOKEN_FILE: (re)start UNIT.service, enabled at boot, and wait until
# URL answers; on failure show the unit's last log lines and exit.
start_service() {
    local unit=$1 url=$2 token_file=$3
    systemctl daemon-reload
    systemctl enable "$unit.service" >/dev/null 2>&1
    systemctl restart "$unit.service"
    wait_http "$url" "$token_file" || { journalctl -u "$unit" -n 30 --no-pager; exit 1; }
}

# lab_cert PREFIX MAKE-CERT-OPTIONS...: a new certificate PREFIX.pem and key PREFIX-key.pem
# (coldferry tls make-cert) signed by the lab CA that vagrant/prepare-host made in .lab/tls,
# and that CA's certificate in $TLS/ca.pem. Made again at every provisioning.
lab_cert() {
    local prefix=$1
    shift
    [[ -s $LAB_CA/ca.pem && -s $LAB_CA/ca-key.pem ]] ||
        { echo "$LAB_CA/ca.pem is missing: run vagrant/prepare-host (it makes the lab's CA)" >&2; exit 1; }
    install -d -m 700 "$TLS"
    install -m 644 "$LAB_CA/ca.pem" "$TLS/ca.pem"
    coldferry tls make-cert --ca "$LAB_CA" --replace "$@" "$prefix" >/dev/null
}
