#!/usr/bin/env bash
# Provisioning of the controller node (runs as root inside the node, after
# common.sh): the coldferry controller as a systemd service on port 8798 over TLS
# (a certificate of the lab CA; the agents' certificates checked against it), with
# every host node of the lab, and root's client configuration so that
# `sudo coldferry ...` on this node talks to it.
#
#   controller.sh HOSTS     HOSTS: "ip=name,..." of all nodes; those named host* are hosts
set -euo pipefail

hosts=${1:?ip=name list}
PORT=8798

say() { echo "provision controller: $*"; }
# shellcheck source=lib.sh
source /vagrant/provision/lib.sh

install -m 600 /vagrant/.lab/controller.token /etc/coldferry/controller.token
install -m 600 /vagrant/.lab/agent.token /etc/coldferry/agent.token
# The certificate names the controller's lab address too, for clients on the other nodes.
address=127.0.0.1
IFS=, read -r -a pairs <<<"$hosts"
for pair in "${pairs[@]}"; do
    if [[ ${pair#*=} == controller ]]; then address=${pair%%=*}; fi
done
say "TLS certificate of the controller, signed by the lab CA"
lab_cert "$TLS/controller" --name controller --dns localhost --ip 127.0.0.1 --ip "$address"
{
    cat <<CONF
# coldferry lab: written by vagrant/provision/controller.sh
[controller]
listen = "0.0.0.0"
port = $PORT
token_file = "/etc/coldferry/controller.token"
database = "sqlite:////var/lib/coldferry/controller.db"
auto_confirm_seconds = 0
tls_cert = "$TLS/controller.pem"
tls_key = "$TLS/controller-key.pem"
agent_ca = "$TLS/ca.pem"
CONF
    IFS=, read -r -a pairs <<<"$hosts"
    for pair in "${pairs[@]}"; do
        ip=${pair%%=*} name=${pair#*=}
        [[ $name == host* ]] || continue
        cat <<CONF

[[hosts]]
name = "$name"
agent_url = "https://$ip:8797"
address = "$ip"
agent_token_file = "/etc/coldferry/agent.token"
CONF
    done
} >/etc/coldferry/controller.toml
chmod 600 /etc/coldferry/controller.toml

install -d -m 700 /root/.config/coldferry
printf '[client]\nurl = "https://127.0.0.1:%d"\ntoken_file = "/etc/coldferry/controller.token"\nca_file = "%s"\n' \
    "$PORT" "$TLS/ca.pem" >/root/.config/coldferry/client.toml

cat >/etc/systemd/system/coldferry-controller.service <<'UNIT'
[Unit]
Description=coldferry controller
Wants=network-online.target
After=network-online.target

[Service]
WorkingDirectory=/var/lib/coldferry
ExecStart=/opt/coldferry/bin/coldferry controller --config /etc/coldferry/controller.toml
Restart=on-failure
RestartSec=3

[Install]
WantedBy=multi-user.target
UNIT
say "waiting for the controller on port $PORT"
start_service coldferry-controller "https://127.0.0.1:$PORT/v1/os-hypervisors" /etc/coldferry/controller.token
say "controller answers (the hosts show as up once their agents run: coldferry host list)"
