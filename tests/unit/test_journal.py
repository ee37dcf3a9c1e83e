"""The resume journal on real files: persistence, torn records, identity, lock."""

from __future__ import annotations

import os
import threading
import time

import pytest

from transfer.errors import StaleResume, TransferError
from transfer.journal import RECORD, Journal

IDENTITY = {"size": 8 << 20, "chunk": 1 << 20, "source": "host1:/var/lib/disk.img@123"}
TARGET = "/srv/images/disk.img"


def h(i: int) -> bytes:
    return bytes([i]) * 16


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / ".disk.img.coldferry-journal")


def open_journal(path, identity=IDENTITY, restart=False, **kw) -> Journal:
    return Journal.open(path, identity, TARGET, restart=restart, **kw)


def reopen(path, **kw) -> dict[int, bytes]:
    j = open_journal(path, **kw)
    try:
        return dict(j.entries)
    finally:
        j.close()


def test_new_journal_is_empty_and_holds_the_header(path):
    j = open_journal(path)
    j.close()
    assert j.entries == {}
    with open(path, "rb") as f:
        assert f.read().endswith(b"\n")  # header only, no records


def test_recorded_entries_survive_reopening(path):
    j = open_journal(path)
    j.record(3, h(3))
    j.record(0, h(0))
    j.record(7, h(7))
    assert j.entries == {3: h(3), 0: h(0), 7: h(7)}
    j.close()
    assert reopen(path) == {0: h(0), 3: h(3), 7: h(7)}


def test_reopening_without_new_records_keeps_entries(path):
    j = open_journal(path)
    j.record(1, h(1))
    j.close()
    assert reopen(path) == {1: h(1)}
    assert reopen(path) == {1: h(1)}  # opening did not rewrite or lose anything


def test_torn_trailing_record_is_ignored(path):
    j = open_journal(path)
    j.record(1, h(1))
    j.record(2, h(2))
    j.close()
    with open(path, "ab") as f:
        f.write(RECORD.pack(5, h(5))[:RECORD.size - 3])  # killed mid-write
    assert reopen(path) == {1: h(1), 2: h(2)}


def test_records_after_a_torn_tail_survive_the_next_resume(path):
    j = open_journal(path)
    j.record(1, h(1))
    j.close()
    with open(path, "ab") as f:
        f.write(b"\x02\x00\x00")  # torn record
    j = open_journal(path)
    assert j.entries == {1: h(1)}
    j.record(2, h(2))
    j.close()
    assert reopen(path) == {1: h(1), 2: h(2)}


def test_different_identity_is_stale_and_names_the_field(path):
    j = open_journal(path)
    j.record(1, h(1))
    j.close()
    other = dict(IDENTITY, source="host1:/var/lib/other.img@456")
    with pytest.raises(StaleResume) as e:
        open_journal(path, identity=other)
    assert "source was 'host1:/var/lib/disk.img@123'" in str(e.value)
    assert "size" not in e.value.reason and "chunk" not in e.value.reason
    assert TARGET in str(e.value)
    # The refused open changed nothing.
    assert reopen(path) == {1: h(1)}


def test_several_differing_fields_are_all_named(path):
    open_journal(path).close()
    with pytest.raises(StaleResume) as e:
        open_journal(path, identity=dict(IDENTITY, size=1, chunk=2))
    assert "chunk was" in e.value.reason and "size was" in e.value.reason


def test_field_only_in_the_new_identity_is_named(path):
    open_journal(path).close()
    with pytest.raises(StaleResume) as e:
        open_journal(path, identity=dict(IDENTITY, mtime=99))
    assert "mtime" in e.value.reason


def test_unreadable_header_is_stale(path):
    with open(path, "wb") as f:
        f.write(b"garbage\n")
    with pytest.raises(StaleResume, match="unreadable journal"):
        open_journal(path)


def test_restart_discards_entries_and_stale_identity(path):
    j = open_journal(path)
    j.record(1, h(1))
    j.close()
    other = dict(IDENTITY, size=1)
    j = open_journal(path, identity=other, restart=True)
    assert j.entries == {}
    j.record(4, h(4))
    j.close()
    assert reopen(path, identity=other) == {4: h(4)}
    with pytest.raises(StaleResume):
        open_journal(path)  # the old identity is gone for good


def test_forget_drops_entries_and_persists(path):
    j = open_journal(path)
    for i in range(5):
        j.record(i, h(i))
    j.forget([1, 3, 99])
    assert j.entries == {0: h(0), 2: h(2), 4: h(4)}
    j.record(6, h(6))  # appends after the rewritten records
    j.close()
    assert reopen(path) == {0: h(0), 2: h(2), 4: h(4), 6: h(6)}


def test_remove_deletes_the_file(path, tmp_path):
    j = open_journal(path)
    j.remove()
    assert not os.path.exists(path)
    j.remove()  # a second remove is harmless


def test_dir_fd_is_honoured(tmp_path):
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        j = Journal.open("rel.journal", IDENTITY, TARGET, restart=False, dir_fd=dir_fd)
        j.record(2, h(2))
        j.remove(dir_fd=dir_fd)
        assert not (tmp_path / "rel.journal").exists()
    finally:
        os.close(dir_fd)


def test_symlink_journal_is_not_followed(path, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    os.symlink(victim, path)
    with pytest.raises(OSError):
        open_journal(path)
    assert victim.read_bytes() == b"keep me"


def test_second_open_waits_for_the_lock_then_fails(path):
    first = open_journal(path)
    try:
        start = time.monotonic()
        with pytest.raises(TransferError, match="still running"):
            open_journal(path, lock_wait=0.3)
        assert time.monotonic() - start >= 0.3
    finally:
        first.close()
    assert reopen(path, lock_wait=0.3) == {}  # free once the first let go


def test_second_open_gets_the_lock_when_released_in_time(path):
    first = open_journal(path)
    first.record(1, h(1))
    timer = threading.Timer(0.2, first.close)
    timer.start()
    try:
        second = open_journal(path, lock_wait=5)
    finally:
        timer.join()
    assert second.entries == {1: h(1)}
    second.close()


def test_a_hard_linked_journal_is_refused_and_the_other_file_untouched(path, tmp_path):
    from transfer.errors import UnsafeFile
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.link(victim, path)
    for restart in (False, True):
        with pytest.raises(UnsafeFile, match="2 links"):
            open_journal(path, restart=restart)
    assert victim.read_bytes() == b"precious"
