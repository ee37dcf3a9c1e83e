#!/usr/bin/env bash
# Provisioning of the controller node (runs as root inside the node, after
# common.sh): the coldferry controller as a systemd service on port 8798, with
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
{
    cat <<CONF
# coldferry lab: written by vagrant/provision/controller.sh
[controller]
listen = "0.0.0.0"
port = $PORT
token_file = "/etc/coldferry/controller.token"
database = "sqlite:////var/lib/coldferry/controller.db"
auto_confirm_seconds = 0
CONF
    IFS=, read -r -a pairs <<<"$hosts"
    for pair in "${pairs[@]}"; do
        ip=${pair%%=*} name=${pair#*=}
        [[ $name == host* ]] || continue
        cat <<CONF

[[hosts]]
name = "$name"
agent_url = "http://$ip:8797"
address = "$ip"
agent_token_file = "/etc/coldferry/agent.token"
CONF
    done
} >/etc/coldferry/controller.toml
chmod 600 /etc/coldferry/controller.toml

install -d -m 700 /root/.config/coldferry
printf '[client]\nurl = "http://127.0.0.1:%d"\ntoken_file = "/etc/coldferry/controller.token"\n' "$PORT" \
    >/root/.config/coldferry/client.toml

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
start_service coldferry-controller "http://127.0.0.1:$PORT/v1/os-hypervisors" /etc/coldferry/controller.token
say "controller answers (the hosts show as up once their agents run: coldferry host list)"
