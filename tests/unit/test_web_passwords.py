"""Dashboard password hashes (passwords.py): round trip, salts, the self-describing format, bad input;
and the helper that prints one (password_hash.py)."""

from __future__ import annotations

import io
import re

import pytest

from controller.web import password_hash
from controller.web.passwords import InvalidHash, hash_password, parse_hash, verify_password



def cheap(password: str, salt: bytes | None = None) -> str:
    """A hash at the cheapest cost the format allows: fast tests (the default cost is checked once)."""
    return hash_password(password, n=2, r=1, p=1, salt=salt)


def test_round_trip_with_the_default_cost() -> None:
    h = hash_password("correct horse")
    assert h.startswith("scrypt$n=16384,r=8,p=1$")
    assert verify_password("correct horse", h)
    assert not verify_password("correct hors", h)
    assert not verify_password("", h)


def test_each_hash_has_its_own_salt() -> None:
    a, b = cheap("same"), cheap("same")
    assert a != b and verify_password("same", a) and verify_password("same", b)


def test_the_same_salt_gives_the_same_hash() -> None:
    salt = bytes(range(16))
    assert cheap("pw", salt) == cheap("pw", salt)


def test_the_cost_is_read_from_the_hash() -> None:
    h = hash_password("pw", n=1024, r=4, p=2)
    parsed = parse_hash(h)
    assert (parsed.n, parsed.r, parsed.p, len(parsed.salt), len(parsed.key)) == (1024, 4, 2, 16, 32)
    assert verify_password("pw", h)


def test_unicode_passwords() -> None:
    h = cheap("pässwörd ✓")
    assert verify_password("pässwörd ✓", h) and not verify_password("passwORD", h)


@pytest.mark.parametrize("text, why", [
    ("", "expected scrypt"),
    ("plaintext", "expected scrypt"),
    ("bcrypt$n=2,r=1,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "expected scrypt"),
    ("scrypt$n=2,r=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "bad cost"),
    ("scrypt$n=x,r=1,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "bad cost"),
    ("scrypt$n=2,r=1,p=1,q=3$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "unknown cost parameter"),
    ("scrypt$n=3,r=1,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "power of two"),
    ("scrypt$n=2097152,r=1,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "power of two"),
    ("scrypt$n=2,r=0,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "each 1 to"),
    ("scrypt$n=2,r=1,p=1$!!!$AAAAAAAAAAAAAAAAAAAAAA", "not base64"),
    ("scrypt$n=2,r=1,p=1$AAAA$AAAAAAAAAAAAAAAAAAAAAA", "too short"),
])
def test_malformed_hashes_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(InvalidHash, match=re.escape(why)) as caught:
        parse_hash(text)
    assert "python -m controller.web.password_hash" in str(caught.value)
    assert verify_password("anything", text) is False


def test_an_empty_password_cannot_be_hashed() -> None:
    with pytest.raises(ValueError, match="empty"):
        hash_password("")


def test_the_helper_prints_a_hash_of_the_line_on_stdin(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert password_hash.main([]) == 0
    printed = capsys.readouterr().out.strip()
    assert verify_password("s3cret", printed)


def test_the_helper_asks_twice_on_a_terminal(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    answers = iter(["one", "two"])
    monkeypatch.setattr("sys.stdin", Tty())
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    assert password_hash.main([]) == 1
    assert "differ" in capsys.readouterr().err


def test_the_helper_refuses_an_empty_password(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert password_hash.main([]) == 1
    assert "empty" in capsys.readouterr().err
