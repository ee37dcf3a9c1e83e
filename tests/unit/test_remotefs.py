"""The remote-fs operations on real directories (``remotefs.do``, without SSH).

Names are confined the way the receiver confines its target: every
component is opened with O_NOFOLLOW from the served directory, so a link
that appears after any check is still never followed.
"""

from __future__ import annotations

import os

import pytest

from transfer import remotefs
from transfer.digest import file_digest
from transfer.errors import PathRefused
from tests.unit.test_target import root  # noqa: F401 - the fixture


@pytest.fixture
def outside(tmp_path):
    o = tmp_path / "outside"
    o.mkdir()
    (o / "victim").write_bytes(b"keep")
    return o


def do(root, op, **args):
    return remotefs.do({"op": op, "root": str(root), **args})


def test_operations(root):
    do(root, "mkdir", name="inst/sub")
    do(root, "mkdir", name="inst/sub")  # again is fine
    assert (root / "inst" / "sub").is_dir()
    do(root, "touch", name="inst/marker")
    assert do(root, "exists", name="inst/marker") and not do(root, "exists", name="inst/nothing")
    assert not do(root, "exists", name="missing/marker")
    (root / "inst" / "data").write_bytes(b"x" * 5000)
    assert do(root, "size", name="inst/data") == 5000
    assert do(root, "digest", name="inst/data") == file_digest(str(root / "inst" / "data"))
    do(root, "rename", name="inst/data", new="inst/sub/data2")
    assert (root / "inst" / "sub" / "data2").read_bytes() == b"x" * 5000
    assert do(root, "free") > 0
    assert do(root, "remove", name="inst") is True
    assert os.listdir(root) == []
    assert do(root, "remove", name="inst") is False
    assert do(root, "remove", name="missing/inst") is False


OPS = [("touch", {}), ("mkdir", {}), ("remove", {}), ("exists", {}), ("size", {}), ("digest", {}),
       ("rename", {}), ("rename", {"swap": True})]


@pytest.mark.parametrize("op, extra", OPS, ids=[f"{op}{'-new' if e else ''}" for op, e in OPS])
def test_a_symlinked_component_is_refused_like_the_receiver_does(root, outside, op, extra):
    (root / "link").symlink_to(outside)
    (root / "mine").write_bytes(b"mine")
    names = {"name": "link/victim"}
    if op == "rename":
        names = {"name": "mine", "new": "link/victim"} if extra else {"name": "link/victim", "new": "mine"}
    with pytest.raises(PathRefused, match="component 'link' is a symbolic link"):
        do(root, op, **names)
    assert os.listdir(outside) == ["victim"] and (outside / "victim").read_bytes() == b"keep"
    assert (root / "mine").read_bytes() == b"mine"


def test_a_link_that_appears_after_any_check_is_still_not_followed(root, outside, monkeypatch):
    """A check-then-use test (islink, then unlink by path) loses the race with a link made in between."""
    (root / "link").symlink_to(outside)
    monkeypatch.setattr(os.path, "islink", lambda path: False)  # as if the link came after the check
    with pytest.raises(PathRefused, match="symbolic link"):
        do(root, "remove", name="link/victim")
    assert (outside / "victim").read_bytes() == b"keep"


def test_a_served_directory_that_is_a_symlink_is_refused(root, tmp_path, outside):
    (tmp_path / "alias").symlink_to(outside)
    for op in ("free", "remove"):
        with pytest.raises(PathRefused, match="served directory is a symbolic link"):
            do(tmp_path / "alias", op, name="victim")
    assert (outside / "victim").read_bytes() == b"keep"


def test_a_symlink_at_the_final_name_is_removed_itself_not_its_target(root, outside):
    (root / "link").symlink_to(outside)
    assert do(root, "exists", name="link")
    assert do(root, "remove", name="link") is True
    assert os.listdir(root) == [] and (outside / "victim").read_bytes() == b"keep"


def test_names_with_control_characters_are_refused(root):
    with pytest.raises(PathRefused, match="control characters"):
        do(root, "touch", name="a\nb")
    assert os.listdir(root) == []
