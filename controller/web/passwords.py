"""Dashboard password hashes: scrypt in a self-describing string.

A hash reads ``scrypt$n=16384,r=8,p=1$<salt>$<key>`` (salt and key in
base64 without padding), so the cost can be raised later without breaking
hashes already in a configuration file. ``python -m controller.web.password_hash``
makes one for ``[[users]]``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

SCHEME = "scrypt"
# 2**14 with r=8 is scrypt's interactive-login cost: about 16 MiB and 50 ms a check.
DEFAULT_N = 2 ** 14
DEFAULT_R = 8
DEFAULT_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
# Bounds on what a configured hash may ask for, so a typo cannot make every login take minutes.
_MAX_N = 2 ** 20
_MAX_RP = 64


class InvalidHash(ValueError):
    """A string that is not a password hash this module made."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"not a coldferry password hash ({reason}); make one with "
                         f"'python -m controller.web.password_hash'")


@dataclass(frozen=True)
class _Parsed:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _derive(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # OpenSSL refuses scrypt above its default 32 MiB unless maxmem allows what n and r need.
    maxmem = 128 * r * (n + p + 2) + 2 ** 20
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length)


def hash_password(password: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P,
                  salt: bytes | None = None) -> str:
    """The hash string of ``password`` with a fresh random salt (or ``salt``).

    :raises ValueError: an empty password, or a cost outside what ``parse_hash`` accepts.
    """
    if not password:
        raise ValueError("the password must not be empty")
    _check_cost(n, r, p)
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    key = _derive(password, salt, n, r, p, _KEY_BYTES)
    return f"{SCHEME}$n={n},r={r},p={p}${_b64(salt)}${_b64(key)}"


def _check_cost(n: int, r: int, p: int) -> None:
    if n < 2 or n > _MAX_N or n & (n - 1):
        raise InvalidHash(f"n={n}: a power of two from 2 to {_MAX_N}")
    if not (1 <= r <= _MAX_RP and 1 <= p <= _MAX_RP):
        raise InvalidHash(f"r={r}, p={p}: each 1 to {_MAX_RP}")


def parse_hash(text: str) -> _Parsed:
    """The parts of a hash string; InvalidHash says what is wrong with it."""
    parts = text.split("$")
    if len(parts) != 4 or parts[0] != SCHEME:
        raise InvalidHash(f"expected {SCHEME}$n=...,r=...,p=...$SALT$KEY")
    try:
        cost = dict(item.split("=", 1) for item in parts[1].split(","))
        n, r, p = int(cost.pop("n")), int(cost.pop("r")), int(cost.pop("p"))
    except (KeyError, ValueError):
        raise InvalidHash(f"bad cost {parts[1]!r}: expected n=N,r=R,p=P") from None
    if cost:
        raise InvalidHash(f"unknown cost parameter(s) {', '.join(sorted(cost))}")
    _check_cost(n, r, p)
    try:
        salt, key = _unb64(parts[2]), _unb64(parts[3])
    except ValueError:
        raise InvalidHash("salt or key is not base64") from None
    if len(salt) < 8 or len(key) < 16:
        raise InvalidHash("salt or key too short")
    return _Parsed(n, r, p, salt, key)


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches ``hashed``; False (never an error) for a malformed hash."""
    try:
        h = parse_hash(hashed)
    except InvalidHash:
        return False
    return hmac.compare_digest(_derive(password, h.salt, h.n, h.r, h.p, len(h.key)), h.key)
