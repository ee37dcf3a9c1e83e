"""bridges.ensure with a fake IPRoute: exists, missing and created, missing and refused."""

from __future__ import annotations

import pytest

from driver.errors import BridgeMissing
from driver.libvirt import bridges
from driver.libvirt.domain_xml import BridgeInterface
from driver.model import Vif


class FakeIPRoute:
    """The pyroute2 IPRoute calls ensure makes, on a dict of link name -> index."""

    instances: list["FakeIPRoute"] = []

    def __init__(self, links: dict[str, int]) -> None:
        self.links = links
        self.calls: list[tuple] = []
        self.closed = False

    def __enter__(self) -> "FakeIPRoute":
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed = True

    def link_lookup(self, ifname: str) -> list[int]:
        return [self.links[ifname]] if ifname in self.links else []

    def link(self, command: str, **kw: object) -> None:
        self.calls.append((command, kw))
        if command == "add":
            self.links[str(kw["ifname"])] = max(self.links.values(), default=1) + 1


@pytest.fixture
def ipr():
    made: list[FakeIPRoute] = []
    links = {"lo": 1, "br-ext": 5}

    def factory() -> FakeIPRoute:
        made.append(FakeIPRoute(links))
        return made[-1]
    factory.made = made
    factory.links = links
    return factory


def test_existing_bridges_are_left_alone(ipr):
    created = bridges.ensure([BridgeInterface("52:54:00:00:00:01", "br-ext")],
                             [Vif("52:54:00:00:00:01", "bridge", "br-ext")], False, "hostB", ipr)
    assert created == []
    assert ipr.made[0].calls == [] and ipr.made[0].closed


def test_missing_bridge_is_created_and_brought_up(ipr):
    created = bridges.ensure([BridgeInterface("52:54:00:00:00:01", "br-new")], [], True, "hostB", ipr)
    assert created == ["br-new"]
    idx = ipr.links["br-new"]
    assert ipr.made[0].calls == [("add", {"ifname": "br-new", "kind": "bridge"}),
                                 ("set", {"index": idx, "state": "up"})]


def test_missing_bridge_without_create_is_bridge_missing(ipr):
    with pytest.raises(BridgeMissing) as e:
        bridges.ensure([BridgeInterface("52:54:00:00:00:01", "br-new")], [], False, "hostB", ipr)
    assert str(e.value) == ("bridge br-new for interface 52:54:00:00:00:01 does not exist on hostB; create it "
                            "there or set create_bridges = true in the driver configuration")
    assert ipr.made[0].calls == [] and "br-new" not in ipr.links


def test_bridges_from_network_info_count_too_and_each_is_created_once(ipr):
    created = bridges.ensure([BridgeInterface("52:54:00:00:00:01", "br-a")],
                             [Vif("52:54:00:00:00:01", "bridge", "br-a"), Vif("52:54:00:00:00:02", "bridge", "br-b"),
                              Vif("52:54:00:00:00:03", "ovs", "br-int"), Vif("52:54:00:00:00:04", "bridge", "")],
                             True, "hostB", ipr)
    assert created == ["br-a", "br-b"]
    assert "br-int" not in ipr.links


def test_nothing_to_do_opens_no_netlink_socket(ipr):
    assert bridges.ensure([BridgeInterface("52:54:00:00:00:01", "")], [Vif("52:54:00:00:00:02", "ovs", "br")],
                          False, "hostB", ipr) == []
    assert ipr.made == []
