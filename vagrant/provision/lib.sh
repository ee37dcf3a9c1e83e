# Shared by the provisioning scripts (sourced from /vagrant/provision inside a node).

# wait_http URL TOKEN_FILE [TRIES]: GET URL with the bearer token in TOKEN_FILE until it
# answers 2xx, two seconds apart; fails after TRIES (default 120) attempts.
wait_http() {
    local url=$1 token_file=$2 tries=${3:-120} i
    for ((i = 0; i < tries; i++)); do
        python3 - "$url" "$token_file" 2>/dev/null <<'PY' && return 0
import sys, urllib.request
token = open(sys.argv[2]).read().strip()
req = urllib.request.Request(sys.argv[1], headers={"Authorization": f"Bearer {token}"})
urllib.request.urlopen(req, timeout=5)
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
