"""Bridges on the target host for bridge-type interfaces (pyroute2)."""

from __future__ import annotations

import logging

from pyroute2 import IPRoute

from ..errors import BridgeMissing
from ..model import Vif
from .domain_xml import BridgeInterface

log = logging.getLogger(__name__)


def ensure(interfaces: list[BridgeInterface], network_info: list[Vif], create: bool, host: str,
           ipr_factory=IPRoute) -> list[str]:
    """Make sure every bridge the instance uses exists; return those created."""
    wanted = {(i.bridge, i.mac) for i in interfaces if i.bridge}
    wanted |= {(v.bridge, v.address) for v in network_info if v.type == "bridge" and v.bridge}
    created = []
    if not wanted:
        return created
    with ipr_factory() as ipr:
        for bridge, mac in sorted(wanted):
            if ipr.link_lookup(ifname=bridge):
                continue
            if not create:
                raise BridgeMissing(bridge=bridge, mac=mac, host=host)
            log.info("creating bridge %s", bridge)
            ipr.link("add", ifname=bridge, kind="bridge")
            idx = ipr.link_lookup(ifname=bridge)[0]
            ipr.link("set", index=idx, state="up")
            created.append(bridge)
    return created
