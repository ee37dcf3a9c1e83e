"""The lab's network: a switch namespace with a bridge, one veth per host, an uplink to the root.

Layout (names for the default prefix ``cflab``)::

    root ns            cflab-switch ns               cflab-hostK ns
    cflab0 198.18.0.1 ── uplink ─┐
                                 br0 ── hostK ─────── eth0 198.18.0.(10+K)

The bridge lives in a namespace of its own rather than in the root namespace:
with br_netfilter loaded, bridged frames go through the iptables FORWARD chain
of the bridge's namespace, and a machine with Docker has ``FORWARD DROP`` there.
The switch namespace has empty firewall tables and bridge-nf-call-* turned off
(per namespace since Linux 5.3), so host-to-host traffic never meets the
machine's firewall and nothing global is changed. The root namespace still
reaches every host through ``cflab0``.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute, netns

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
BRIDGE_NF = "/proc/sys/net/bridge"


@dataclass(frozen=True)
class LabNet:
    """Names and addresses of one lab network."""

    prefix: str = "cflab"
    subnet: str = "198.18.0.0/24"
    host_offset: int = 10
    bridge: str = "br0"
    uplink: str = "uplink"

    @property
    def root_iface(self) -> str:
        return f"{self.prefix}0"

    @property
    def switch_ns(self) -> str:
        return f"{self.prefix}-switch"

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> str:
        return str(self.network.network_address + 1)

    @property
    def max_hosts(self) -> int:
        return self.network.num_addresses - 2 - self.host_offset

    def host_ns(self, index: int) -> str:
        return f"{self.prefix}-host{index}"

    def host_ip(self, index: int) -> str:
        if not 1 <= index <= self.max_hosts:
            raise ValueError(f"host index {index} outside 1..{self.max_hosts} for {self.subnet}")
        return str(self.network.network_address + self.host_offset + index)

    def namespaces(self) -> list[str]:
        """Every existing namespace of this prefix (switch and hosts), by name."""
        if not NETNS_DIR.is_dir():
            return []
        return sorted(n for n in netns.listnetns() if n.startswith(f"{self.prefix}-"))


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def _link_index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _disable_bridge_netfilter(ns: str) -> None:
    """Turn bridge-nf-call-{ip,ip6,arp}tables off inside ``ns`` (a no-op without br_netfilter)."""
    files = [f"{BRIDGE_NF}/bridge-nf-call-{t}" for t in ("iptables", "ip6tables", "arptables")]
    # /proc/sys/net shows the namespace of the process that opens it, hence nsenter.
    probe = subprocess.run(["nsenter", f"--net={netns_path(ns)}", "--", "test", "-d", BRIDGE_NF],
                           timeout=10)
    if probe.returncode != 0:
        log.debug("br_netfilter not loaded; nothing to turn off in %s", ns)
        return
    subprocess.run(["nsenter", f"--net={netns_path(ns)}", "--", "tee", *files], input=b"0\n",
                   stdout=subprocess.DEVNULL, check=True, timeout=10)


def create_switch(net: LabNet) -> None:
    """Make the switch namespace with its bridge, and ``cflab0`` in the root namespace."""
    log.info("creating switch namespace %s and %s (%s/%d)", net.switch_ns, net.root_iface,
             net.gateway, net.network.prefixlen)
    netns.create(net.switch_ns)
    _disable_bridge_netfilter(net.switch_ns)
    with IPRoute(netns=net.switch_ns) as sw:
        sw.link("set", index=_link_index(sw, "lo"), state="up")
        sw.link("add", ifname=net.bridge, kind="bridge", br_stp_state=0, br_forward_delay=0)
        sw.link("set", index=_link_index(sw, net.bridge), state="up")
    with IPRoute() as root:
        root.link("add", ifname=net.root_iface, kind="veth",
                  peer={"ifname": net.uplink, "net_ns_fd": net.switch_ns})
        idx = _link_index(root, net.root_iface)
        root.addr("add", index=idx, address=net.gateway, prefixlen=net.network.prefixlen)
        root.link("set", index=idx, state="up")
    with IPRoute(netns=net.switch_ns) as sw:
        sw.link("set", index=_link_index(sw, net.uplink), master=_link_index(sw, net.bridge),
                state="up")


def add_host(net: LabNet, index: int) -> None:
    """Make host ``index``'s namespace: lo up, ``eth0`` with its address, cabled to the bridge."""
    ns, ip, port = net.host_ns(index), net.host_ip(index), f"host{index}"
    log.info("creating network namespace %s with eth0 %s", ns, ip)
    netns.create(ns)
    with IPRoute(netns=net.switch_ns) as sw:
        sw.link("add", ifname=port, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
        sw.link("set", index=_link_index(sw, port), master=_link_index(sw, net.bridge), state="up")
    with IPRoute(netns=ns) as host:
        host.link("set", index=_link_index(host, "lo"), state="up")
        eth0 = _link_index(host, "eth0")
        host.addr("add", index=eth0, address=ip, prefixlen=net.network.prefixlen)
        host.link("set", index=eth0, state="up")


def leftovers(net: LabNet) -> list[str]:
    """Names of this lab's interfaces and namespaces that exist now."""
    with IPRoute() as root:
        iface = [net.root_iface] if _link_index(root, net.root_iface) is not None else []
    return iface + net.namespaces()


def remove(net: LabNet, names: list[str] | None = None) -> list[str]:
    """Delete ``cflab0`` and the lab's namespaces (``names``, or all of the prefix); idempotent.

    Deleting a namespace deletes its veth ends, and with them their peers. Returns
    the problems met (empty when all is gone).
    """
    problems: list[str] = []
    with IPRoute() as root:
        idx = _link_index(root, net.root_iface)
        if idx is not None:
            log.info("deleting %s", net.root_iface)
            try:
                root.link("del", index=idx)
            except Exception as exc:  # noqa: BLE001 - report and go on with the rest
                problems.append(f"could not delete {net.root_iface}: {exc}")
    for name in dict.fromkeys((names or []) + net.namespaces()):
        if not (NETNS_DIR / name).exists():
            continue
        log.info("deleting network namespace %s", name)
        try:
            netns.remove(name)
        except OSError as exc:
            problems.append(f"could not delete network namespace {name}: {exc}")
    return problems
