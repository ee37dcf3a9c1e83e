#!/usr/bin/env bash
# Provisioning of every lab node (runs as root inside the node, offline):
# /etc/hosts naming all nodes, and coldferry installed into /opt/coldferry from
# the wheels vagrant/prepare-host built (synced to /vagrant/.lab/wheels).
#
#   common.sh NODE_NAME HOSTS     HOSTS: "ip=name,ip=name,..."
set -euo pipefail

name=${1:?node name}
hosts=${2:?ip=name list}
LAB=/vagrant/.lab
VENV=/opt/coldferry

say() { echo "provision $name: $*"; }

say "/etc/hosts"
{
    printf '127.0.0.1\tlocalhost\n'
    IFS=, read -r -a pairs <<<"$hosts"
    for pair in "${pairs[@]}"; do
        printf '%s\t%s\n' "${pair%%=*}" "${pair#*=}"
    done
} >/etc/hosts

# The wheel of coldferry itself names the version; reinstall only when the wheels changed.
stamp=$VENV/.lab-wheels
want=$(cd "$LAB/wheels" && ls -1 | sort | sha256sum | cut -d' ' -f1)$(sha256sum "$LAB"/wheels/coldferry-*.whl | cut -d' ' -f1)
if [[ -x $VENV/bin/coldferry && -f $stamp && $(<"$stamp") == "$want" ]]; then
    say "coldferry already installed from these wheels"
else
    say "installing coldferry from $LAB/wheels (no index)"
    [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --no-index --find-links "$LAB/wheels" \
        --disable-pip-version-check --force-reinstall "$(ls "$LAB"/wheels/coldferry-*.whl)"
    echo "$want" >"$stamp"
fi
ln -sf "$VENV/bin/coldferry" /usr/local/bin/coldferry
install -d -m 755 /etc/coldferry /var/lib/coldferry
say "$(coldferry --help >/dev/null && echo "coldferry ready: $(readlink -f /usr/local/bin/coldferry)")"
