"""Where the receiver writes: names confined to the served root, on real directories."""

from __future__ import annotations

import errno
import os

import pytest

from transfer import target as target_mod
from transfer.errors import PathRefused, TargetExists, UnsafeFile
from transfer.journal import Journal
from transfer.target import JOURNAL_SUFFIX, PART_SUFFIX, Target, punch_hole


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def resolve(root):
    """Target.resolve under ``root``; every target is closed after the test."""
    opened = []

    def do(name: str) -> Target:
        t = Target.resolve(str(root), name)
        opened.append(t)
        return t

    yield do
    for t in opened:
        t.close()


class TestResolve:
    @pytest.mark.parametrize("name", [
        "..", "../x", "a/../b", "a/..", ".", "./a", "a/./b",
        "/etc/passwd", "/", "", "a//b", "a/", "a\0b",
    ])
    def test_refuses_names_that_are_not_plain_relative_paths(self, root, name):
        with pytest.raises(PathRefused) as e:
            Target.resolve(str(root), name)
        assert repr(name) in str(e.value)
        assert os.listdir(root) == []  # nothing was created on the way

    def test_refuses_a_relative_root(self):
        with pytest.raises(PathRefused, match="absolute path"):
            Target.resolve("relative/root", "disk.img")

    def test_refuses_a_missing_root(self, tmp_path):
        with pytest.raises(PathRefused, match="served directory"):
            Target.resolve(str(tmp_path / "missing"), "disk.img")

    def test_refuses_a_served_directory_that_is_a_symlink(self, root, tmp_path):
        (tmp_path / "alias").symlink_to(root)
        with pytest.raises(PathRefused, match="served directory is a symbolic link"):
            Target.resolve(str(tmp_path / "alias"), "disk.img")

    @pytest.mark.parametrize("name", ["disk\n.img", "a/b\tc", "x\x1b[31m", "del\x7f", "c1\x85", "a\0b"])
    def test_refuses_control_characters(self, root, name):
        with pytest.raises(PathRefused, match="control characters") as e:
            Target.resolve(str(root), name)
        assert repr(name) in str(e.value)
        assert os.listdir(root) == []

    def test_refuses_an_overlong_component(self, root):
        with pytest.raises(PathRefused, match="too long"):
            Target.resolve(str(root), "a" * 250)

    def test_refuses_a_symlink_component_pointing_out_of_the_root(self, root, tmp_path):
        outside = tmp_path / "outside"
        outside.mkdir()
        (root / "escape").symlink_to(outside)
        with pytest.raises(PathRefused, match="'escape'"):
            Target.resolve(str(root), "escape/sub/disk.img")
        assert os.listdir(outside) == []  # nothing created through the link

    def test_refuses_a_symlink_component_even_inside_the_root(self, root):
        (root / "real").mkdir()
        (root / "alias").symlink_to(root / "real")
        with pytest.raises(PathRefused, match="symbolic link"):
            Target.resolve(str(root), "alias/disk.img")

    def test_regular_file_component_is_not_called_a_symlink(self, root):
        (root / "plain").write_bytes(b"")
        with pytest.raises(PathRefused) as e:
            Target.resolve(str(root), "plain/disk.img")
        assert "symbolic link" not in str(e.value)

    def test_creates_missing_parent_directories_inside_the_root(self, root, resolve):
        t = resolve("vms/web/disk.img")
        assert (root / "vms" / "web").is_dir()
        assert not (root / "vms" / "web").is_symlink()
        assert os.path.samestat(os.fstat(t.dir_fd), os.stat(root / "vms" / "web"))
        assert t.base == "disk.img"
        assert t.path == os.path.join(str(root), "vms/web/disk.img")
        assert t.part == f".disk.img{PART_SUFFIX}"
        assert t.journal == f".disk.img{JOURNAL_SUFFIX}"
        assert not (root / "vms" / "web" / "disk.img").exists()

    def test_existing_parent_directories_are_reused(self, root, resolve):
        (root / "vms").mkdir()
        (root / "vms" / "keep").write_bytes(b"x")
        t = resolve("vms/disk.img")
        assert os.path.samestat(os.fstat(t.dir_fd), os.stat(root / "vms"))
        assert (root / "vms" / "keep").read_bytes() == b"x"


class TestCheckWritable:
    def test_new_name_is_writable(self, resolve):
        resolve("disk.img").check_writable(overwrite=False)

    def test_existing_file_needs_overwrite(self, root, resolve):
        (root / "disk.img").write_bytes(b"old")
        t = resolve("disk.img")
        with pytest.raises(TargetExists, match="--overwrite"):
            t.check_writable(overwrite=False)
        t.check_writable(overwrite=True)
        assert (root / "disk.img").read_bytes() == b"old"  # checking changes nothing

    def test_symlink_at_the_final_name_is_refused_even_with_overwrite(self, root, tmp_path, resolve):
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        (root / "disk.img").symlink_to(victim)
        t = resolve("disk.img")
        with pytest.raises(PathRefused, match="not a regular file"):
            t.check_writable(overwrite=True)

    def test_dangling_symlink_at_the_final_name_is_refused(self, root, resolve):
        (root / "disk.img").symlink_to(root / "nowhere")
        with pytest.raises(PathRefused, match="not a regular file"):
            resolve("disk.img").check_writable(overwrite=False)

    def test_directory_at_the_final_name_is_refused(self, root, resolve):
        (root / "disk.img").mkdir()
        with pytest.raises(PathRefused, match="not a regular file"):
            resolve("disk.img").check_writable(overwrite=True)

    @pytest.mark.parametrize("entry", [f".disk.img{PART_SUFFIX}", f".disk.img{JOURNAL_SUFFIX}"])
    def test_symlink_as_part_or_journal_is_refused(self, root, tmp_path, resolve, entry):
        (root / entry).symlink_to(tmp_path / "elsewhere")
        with pytest.raises(PathRefused, match=entry.replace(".", r"\.")):
            resolve("disk.img").check_writable(overwrite=True)


    @pytest.mark.parametrize("entry", [f".disk.img{PART_SUFFIX}", f".disk.img{JOURNAL_SUFFIX}"])
    def test_hard_linked_part_or_journal_is_refused(self, root, tmp_path, resolve, entry):
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        os.link(victim, root / entry)
        with pytest.raises(UnsafeFile, match="2 links"):
            resolve("disk.img").check_writable(overwrite=True)
        assert victim.read_bytes() == b"precious"


class TestPartFile:
    def test_open_part_sizes_the_file(self, root, resolve):
        t = resolve("disk.img")
        assert not t.has_part()
        fd = t.open_part(1 << 20, fresh=True)
        os.close(fd)
        assert t.has_part()
        assert os.stat(root / t.part).st_size == 1 << 20

    def test_open_part_keeps_data_unless_fresh(self, root, resolve):
        t = resolve("disk.img")
        fd = t.open_part(4096, fresh=True)
        os.pwrite(fd, b"resume me", 0)
        os.close(fd)
        fd = t.open_part(4096, fresh=False)
        assert os.pread(fd, 9, 0) == b"resume me"
        os.close(fd)
        fd = t.open_part(4096, fresh=True)
        assert os.pread(fd, 9, 0) == bytes(9)
        os.close(fd)

    def test_commit_moves_the_part_into_place(self, root, resolve):
        (root / "disk.img").write_bytes(b"old contents")
        t = resolve("disk.img")
        fd = t.open_part(11, fresh=True)
        os.pwrite(fd, b"new content", 0)
        os.close(fd)
        t.commit(overwrite=True)
        assert (root / "disk.img").read_bytes() == b"new content"
        assert not (root / t.part).exists()
        assert not t.has_part()

    @pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "link-and-unlink"])
    def test_commit_never_replaces_a_file_that_appeared_since_the_check(self, root, resolve, monkeypatch,
                                                                        renameat2):
        if not renameat2:
            monkeypatch.setattr(target_mod, "_renameat2", None)
        t = resolve("disk.img")
        t.check_writable(overwrite=False)
        os.close(t.open_part(3, fresh=True))
        (root / "disk.img").write_bytes(b"theirs")
        with pytest.raises(TargetExists):
            t.commit(overwrite=False)
        assert (root / "disk.img").read_bytes() == b"theirs"
        assert t.has_part()  # finished and verified: kept for a run with --overwrite

    @pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "link-and-unlink"])
    def test_commit_without_overwrite_moves_the_part_into_place(self, root, resolve, monkeypatch, renameat2):
        if not renameat2:
            monkeypatch.setattr(target_mod, "_renameat2", None)
        t = resolve("disk.img")
        fd = t.open_part(3, fresh=True)
        os.pwrite(fd, b"new", 0)
        os.close(fd)
        t.commit(overwrite=False)
        assert os.listdir(root) == ["disk.img"]
        assert (root / "disk.img").read_bytes() == b"new"

    def test_open_part_refuses_a_hard_link_made_after_the_check(self, root, tmp_path, resolve):
        t = resolve("disk.img")
        t.check_writable(overwrite=False)
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        os.link(victim, root / t.part)
        for fresh in (True, False):
            with pytest.raises(UnsafeFile, match="2 links"):
                t.open_part(1 << 20, fresh=fresh)
        assert victim.read_bytes() == b"precious"

    def test_discard_removes_part_and_journal(self, root, resolve):
        t = resolve("disk.img")
        os.close(t.open_part(100, fresh=True))
        Journal.open(t.journal, {"size": 100}, t.path, restart=False, dir_fd=t.dir_fd).close()
        assert sorted(os.listdir(root)) == sorted([t.part, t.journal])
        t.discard()
        assert os.listdir(root) == []
        t.discard()  # nothing left to remove is fine

    def test_discard_leaves_the_target_itself(self, root, resolve):
        (root / "disk.img").write_bytes(b"keep")
        t = resolve("disk.img")
        os.close(t.open_part(10, fresh=True))
        t.discard()
        assert os.listdir(root) == ["disk.img"]

    def test_free_bytes_is_positive(self, resolve):
        assert resolve("disk.img").free_bytes() > 0

    def test_close_is_idempotent(self, root):
        t = Target.resolve(str(root), "disk.img")
        t.close()
        assert t.dir_fd == -1
        t.close()


class TestPunchHole:
    SIZE = 1 << 20

    @pytest.fixture
    def dense(self, tmp_path):
        path = tmp_path / "dense"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(fd, b"\xaa" * self.SIZE, 0)
        os.fsync(fd)
        yield fd
        os.close(fd)

    def test_range_reads_as_zeros_and_is_deallocated(self, dense):
        before = os.fstat(dense).st_blocks
        off, n = 256 << 10, 256 << 10
        punch_hole(dense, off, n)
        st = os.fstat(dense)
        assert st.st_size == self.SIZE  # size is kept
        assert os.pread(dense, n, off) == bytes(n)
        assert os.pread(dense, off, 0) == b"\xaa" * off
        assert os.pread(dense, self.SIZE - off - n, off + n) == b"\xaa" * (self.SIZE - off - n)
        assert st.st_blocks <= before - n // 512

    def test_unaligned_range_still_reads_as_zeros(self, dense):
        punch_hole(dense, 1000, 10000)
        assert os.pread(dense, 10000, 1000) == bytes(10000)
        assert os.pread(dense, 1000, 0) == b"\xaa" * 1000
        assert os.pread(dense, 1, 11000) == b"\xaa"

    def test_writes_zeros_where_punching_is_unsupported(self, dense, monkeypatch):
        class NoPunch:
            def fallocate(self, *args):
                return -1

        monkeypatch.setattr(target_mod, "_libc", NoPunch())
        monkeypatch.setattr(target_mod.ctypes, "get_errno", lambda: errno.EOPNOTSUPP)
        punch_hole(dense, 4096, 3 << 20)  # past the end: the file grows, with zeros
        assert os.pread(dense, 4096, 0) == b"\xaa" * 4096
        assert os.pread(dense, 3 << 20, 4096) == bytes(3 << 20)

    def test_other_errors_are_raised(self, tmp_path):
        path = tmp_path / "ro"
        path.write_bytes(b"x" * 8192)
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                punch_hole(fd, 0, 4096)
            assert e.value.errno == errno.EBADF
        finally:
            os.close(fd)
        assert path.read_bytes() == b"x" * 8192
