"""Parsing ``[USER@]HOST:PATH`` destinations and checking their SSH settings."""

from __future__ import annotations

import getpass

import pytest

from transfer.endpoint import DEFAULT_REMOTE_COMMAND, Endpoint, is_host_address
from transfer.errors import InvalidArgument


@pytest.fixture
def kh(tmp_path):
    path = tmp_path / "known_hosts"
    path.write_text("host2 ssh-ed25519 AAAA\n")
    return str(path)


def test_host_and_path(kh):
    ep = Endpoint.parse("host2:/var/lib/images/disk.img", known_hosts=kh)
    assert (ep.host, ep.path, ep.port) == ("host2", "/var/lib/images/disk.img", 22)
    assert ep.user == getpass.getuser()
    assert ep.remote_command == DEFAULT_REMOTE_COMMAND
    assert ep.root == "/var/lib/images"
    assert ep.name == "disk.img"


def test_user_at_host(kh):
    ep = Endpoint.parse("root@host2:/disk.img", known_hosts=kh)
    assert (ep.user, ep.host, ep.path) == ("root", "host2", "/disk.img")
    assert ep.root == "/"
    assert ep.name == "disk.img"
    assert str(ep) == "root@host2:/disk.img"


def test_user_in_spec_wins_over_settings(kh):
    ep = Endpoint.parse("alice@host2:/d.img", known_hosts=kh, user="bob")
    assert ep.user == "alice"
    assert Endpoint.parse("host2:/d.img", known_hosts=kh, user="bob").user == "bob"


@pytest.mark.parametrize("spec, host", [("[::1]:/d.img", "::1"),
                                        ("root@[fe80::1]:/d.img", "fe80::1"),
                                        ("10.0.0.2:/d.img", "10.0.0.2")])
def test_address_hosts(kh, spec, host):
    ep = Endpoint.parse(spec, known_hosts=kh)
    assert ep.host == host
    assert ep.path == "/d.img"


def test_colon_in_path_belongs_to_the_path(kh):
    assert Endpoint.parse("host2:/a:b.img", known_hosts=kh).path == "/a:b.img"


def test_settings_fill_fields_and_none_means_default(kh, tmp_path):
    key = tmp_path / "id_ed25519"
    key.write_text("key")
    ep = Endpoint.parse("host2:/d.img", known_hosts=kh, port=2222, identity=str(key),
                        remote_command=("/opt/cf", "receive"))
    assert (ep.port, ep.identity, ep.remote_command) == (2222, str(key), ("/opt/cf", "receive"))
    assert Endpoint.parse("host2:/d.img", known_hosts=kh, port=None, identity=None).port == 22


@pytest.mark.parametrize("spec", ["host2/disk.img", "disk.img", "host2:", ":/disk.img",
                                  "@host2:/d.img", "a@b@host2:/d.img", "::1:/d.img", ""])
def test_malformed_spec_is_refused_with_an_example(kh, spec):
    with pytest.raises(InvalidArgument) as e:
        Endpoint.parse(spec, known_hosts=kh)
    assert "destination" in str(e.value)
    assert "[USER@]HOST:PATH" in str(e.value)


def test_relative_path_is_refused(kh):
    with pytest.raises(InvalidArgument, match="absolute path on the remote host"):
        Endpoint.parse("host2:images/disk.img", known_hosts=kh)


@pytest.mark.parametrize("spec", ["host2:/var/lib/images/", "host2:/"])
def test_directory_path_is_refused(kh, spec):
    with pytest.raises(InvalidArgument, match="name the destination file, not a directory"):
        Endpoint.parse(spec, known_hosts=kh)


def test_missing_known_hosts_is_refused(tmp_path):
    missing = str(tmp_path / "no_known_hosts")
    with pytest.raises(InvalidArgument) as e:
        Endpoint.parse("host2:/d.img", known_hosts=missing)
    assert "known_hosts file" in str(e.value)
    assert missing in str(e.value)
    assert "known in advance" in str(e.value)


def test_missing_identity_is_refused(kh, tmp_path):
    with pytest.raises(InvalidArgument, match="identity file"):
        Endpoint.parse("host2:/d.img", known_hosts=kh, identity=str(tmp_path / "nokey"))


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_bad_port_is_refused(kh, port):
    with pytest.raises(InvalidArgument) as e:
        Endpoint.parse("host2:/d.img", known_hosts=kh, port=port)
    assert "SSH port" in str(e.value)
    assert "1-65535" in str(e.value)


@pytest.mark.parametrize("port", [1, 65535])
def test_port_limits_are_accepted(kh, port):
    assert Endpoint.parse("host2:/d.img", known_hosts=kh, port=port).port == port


@pytest.mark.parametrize("text", ["h2", "host-2.lab.example", "host2.", "198.18.0.12", "fd00::12", "a" * 63])
def test_host_addresses(text):
    assert is_host_address(text)


@pytest.mark.parametrize("text", ["", "h2/system", "h2?x=1", "h2#", "user@h2", "h2:22", "[fd00::12]", "-h2", "h2-",
                                  "h 2", "h2\n", "a" * 64, "a." * 127 + "a", "h..2"])
def test_not_host_addresses(text):
    assert not is_host_address(text)
