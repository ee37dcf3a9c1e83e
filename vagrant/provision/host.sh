#!/usr/bin/env bash
# Provisioning of a KVM host node (runs as root inside the node, after common.sh):
# libvirtd, the bridge the lab's guests plug into, SSH host keys and root's key
# shared with the other host (so disk copies verify host keys strictly), the test
# guest's kernel and initramfs, and the coldferry agent as a systemd service serving
# TLS with a certificate of the lab CA.
#
#   host.sh NODE_NAME NODE_IP
set -euo pipefail

name=${1:?node name}
ip=${2:?node address}
LAB=/vagrant/.lab
BRIDGE=cfbr0
AGENT_PORT=8797
INSTANCES=/var/lib/coldferry/instances
GUEST_DIR=/var/lib/coldferry/test-guest

say() { echo "provision $name: $*"; }
# shellcheck source=lib.sh
source /vagrant/provision/lib.sh

say "libvirtd"
systemctl enable --now libvirtd.service >/dev/null 2>&1
# The guest domain type on this node: KVM only where the node's CPU has virtualization
# extensions (nested virtualization), TCG otherwise. /dev/kvm itself is no sign: the
# kernel's static device nodes create it whether or not KVM can load.
if grep -qwE 'vmx|svm' /proc/cpuinfo; then echo kvm; else echo qemu; fi >/etc/coldferry/guest-domain-type
say "guests will run as domain type $(</etc/coldferry/guest-domain-type)"

say "bridge $BRIDGE for the lab's guests"
cat >/etc/systemd/system/coldferry-bridge.service <<UNIT
[Unit]
Description=Bridge $BRIDGE for coldferry lab guests
Before=libvirtd.service coldferry-agent.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'ip link show $BRIDGE >/dev/null 2>&1 || ip link add $BRIDGE type bridge'
ExecStart=/sbin/ip link set $BRIDGE up

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now coldferry-bridge.service >/dev/null 2>&1

say "SSH: this host's key, root's key, known_hosts of both hosts"
install -m 600 "$LAB/ssh/${name}_ed25519_key" /etc/ssh/ssh_host_ed25519_key
install -m 644 "$LAB/ssh/${name}_ed25519_key.pub" /etc/ssh/ssh_host_ed25519_key.pub
# Offer only the key the other host knows.
printf 'HostKey /etc/ssh/ssh_host_ed25519_key\nPermitRootLogin prohibit-password\n' \
    >/etc/ssh/sshd_config.d/coldferry-lab.conf
install -d -m 700 /root/.ssh
install -m 600 "$LAB/ssh/id_ed25519" /root/.ssh/id_ed25519
install -m 644 "$LAB/ssh/id_ed25519.pub" /root/.ssh/id_ed25519.pub
install -m 600 "$LAB/ssh/id_ed25519.pub" /root/.ssh/authorized_keys
install -m 644 "$LAB/ssh/known_hosts" /root/.ssh/known_hosts
systemctl restart ssh.service

say "test guest kernel and initramfs in $GUEST_DIR"
install -d -m 755 "$GUEST_DIR" "$INSTANCES"
install -m 644 "$LAB"/test-guest/vmlinuz "$LAB"/test-guest/initrd.img "$GUEST_DIR/"
install -m 755 /vagrant/provision/lab-guest /usr/local/sbin/coldferry-lab-guest

say "TLS certificate of the agent for $name and $ip, signed by the lab CA"
lab_cert "$TLS/agent" --name "$name" --ip "$ip"

say "coldferry agent on https://$ip:$AGENT_PORT"
install -m 600 "$LAB/agent.token" /etc/coldferry/agent.token
cat >/etc/coldferry/agent.toml <<CONF
# coldferry lab: written by vagrant/provision/host.sh
[agent]
listen = "0.0.0.0"
port = $AGENT_PORT
token_file = "/etc/coldferry/agent.token"
address = "$ip"
driver = "libvirt"
tls_cert = "$TLS/agent.pem"
tls_key = "$TLS/agent-key.pem"

[driver]
libvirt_uri = "qemu:///system"
instances_path = "$INSTANCES"
host_name = "$name"
transfer_method = "stream"
ssh_identity = "/root/.ssh/id_ed25519"
ssh_known_hosts = "/root/.ssh/known_hosts"
remote_command = ["/opt/coldferry/bin/coldferry", "receive"]
shutdown_timeout = 60
shutdown_retry_interval = 10
start_timeout = 300
CONF
cat >/etc/systemd/system/coldferry-agent.service <<UNIT
[Unit]
Description=coldferry agent of $name
Wants=network-online.target
After=network-online.target libvirtd.service coldferry-bridge.service ssh.service
Requires=libvirtd.service

[Service]
ExecStart=/opt/coldferry/bin/coldferry agent --config /etc/coldferry/agent.toml
Restart=on-failure
RestartSec=3

[Install]
WantedBy=multi-user.target
UNIT
start_service coldferry-agent "https://$ip:$AGENT_PORT/v1/host" /etc/coldferry/agent.token
say "agent answers"
