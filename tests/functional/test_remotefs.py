"""File operations on the 'remote' host through a real sshd and coldferry remote-fs."""

from __future__ import annotations

import pytest

from tests.conftest import coldferry_command
from transfer import Endpoint, PathRefused, file_digest
from transfer.errors import TransferError
from transfer.remotefs import RemoteFS


@pytest.fixture
def rfs(sshd, tmp_path):
    ep = Endpoint(host=sshd.host, path="/", user=sshd.user, port=sshd.port, identity=str(sshd.identity),
                  known_hosts=str(sshd.known_hosts), remote_command=tuple(coldferry_command()))
    root = tmp_path / "root"
    root.mkdir()
    with RemoteFS(ep, str(root)) as fs:
        yield fs, root


def test_operations_in_one_session(rfs):
    fs, root = rfs
    fs.mkdir("inst/sub")
    assert (root / "inst" / "sub").is_dir()
    fs.touch("inst/marker")
    assert fs.exists("inst/marker") and not fs.exists("inst/nothing")
    (root / "inst" / "data").write_bytes(b"x" * 5000)
    assert fs.size("inst/data") == 5000
    assert fs.digest("inst/data") == file_digest(str(root / "inst" / "data"))
    fs.rename("inst/data", "inst/data2")
    assert (root / "inst" / "data2").exists()
    assert fs.free() > 0
    assert fs.remove("inst") is True
    assert not (root / "inst").exists()
    assert fs.remove("inst") is False


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", ""])
def test_names_outside_the_root_are_refused(rfs, name):
    fs, root = rfs
    with pytest.raises(PathRefused):
        fs.touch(name)
    # The session survives a refusal.
    fs.touch("fine")
    assert (root / "fine").exists()


def test_symlinked_component_is_refused(rfs, tmp_path):
    fs, root = rfs
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep")
    (root / "link").symlink_to(outside)
    with pytest.raises(PathRefused):
        fs.remove("link/victim")
    assert (outside / "victim").read_text() == "keep"


def test_os_errors_come_back_as_clear_errors(rfs):
    fs, root = rfs
    with pytest.raises(TransferError, match="size 'missing'"):
        fs.size("missing")


def test_symlinked_served_directory_is_refused(sshd, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "victim").write_text("keep")
    (tmp_path / "alias").symlink_to(real)
    ep = Endpoint(host=sshd.host, path="/", user=sshd.user, port=sshd.port, identity=str(sshd.identity),
                  known_hosts=str(sshd.known_hosts), remote_command=tuple(coldferry_command()))
    with RemoteFS(ep, str(tmp_path / "alias")) as fs:
        with pytest.raises(PathRefused, match="served directory is a symbolic link"):
            fs.remove("victim")
    assert (real / "victim").read_text() == "keep"
