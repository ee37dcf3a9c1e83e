"""The dashboard's settings in the controller configuration: [[users]] and the session secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.config import ControllerConfig, ControllerConfigError, UserConfig
from controller.web.passwords import hash_password

HASH = hash_password("pw", n=2, r=1, p=1)


def load(tmp_path: Path, text: str) -> ControllerConfig:
    p = tmp_path / "controller.toml"
    p.write_text('[controller]\ntoken = "admin"\n' + text)
    return ControllerConfig.load(str(p))


def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ControllerConfigError) as e:
        load(tmp_path, text)
    return str(e.value)


def user(name: str = "alice", role: str | None = "admin", password_hash: str = HASH, extra: str = "") -> str:
    role_line = f'role = "{role}"\n' if role is not None else ""
    return f'[[users]]\nname = "{name}"\npassword_hash = "{password_hash}"\n{role_line}{extra}'


def test_no_users_and_no_secret_by_default(tmp_path: Path) -> None:
    c = load(tmp_path, "")
    assert (c.users, c.session_secret, c.session_max_age) == ((), None, 43200)


def test_users_with_roles(tmp_path: Path) -> None:
    c = load(tmp_path, user("alice") + user("bob", role="reader") + user("carol", role=None))
    assert c.users == (UserConfig("alice", HASH, "admin"), UserConfig("bob", HASH, "reader"),
                       UserConfig("carol", HASH, "reader"))
    assert HASH not in repr(c.users[0])


@pytest.mark.parametrize("text, reason", [
    (user(role="root"), "bad [[users]] entry 1 ('alice') role = 'root' in "),
    (user(role="root"), ": one of admin, reader"),
    (user(password_hash="hunter2"), "bad [[users]] entry 1 ('alice') password_hash in "),
    (user(password_hash="hunter2"), ": not a coldferry password hash"),
    (user(password_hash=""), "bad [[users]] entry 1 ('alice') password_hash in "),
    (user(name=""), "bad [[users]] entry 1 ('') name = '' in "),
    (user() + user(), "[[users]] entry 2 ('alice') has a duplicate user name 'alice'"),
    (user(extra='password = "pw"\n'), "has unknown key(s) password in "),
])
def test_bad_users_are_refused_with_the_reason(tmp_path: Path, text: str, reason: str) -> None:
    msg = load_error(tmp_path, text)
    assert reason in msg and "\n" not in msg
    assert "hunter2" not in msg  # a password typed where its hash belongs stays out of logs


def test_users_must_be_an_array_of_tables() -> None:
    with pytest.raises(ControllerConfigError, match="users must be an array of tables"):
        ControllerConfig.from_dict({"controller": {"token": "admin"}, "users": "alice"})


def test_session_secret_inline_or_from_a_file(tmp_path: Path) -> None:
    assert load(tmp_path, 'session_secret = "0123456789abcdefXYZ"\n').session_secret == "0123456789abcdefXYZ"
    (tmp_path / "session.secret").write_text("a-secret-from-a-file-0123\n")
    assert load(tmp_path, 'session_secret_file = "session.secret"\n').session_secret == "a-secret-from-a-file-0123"


def test_session_settings_are_checked(tmp_path: Path) -> None:
    msg = load_error(tmp_path, 'session_secret = "short"\n')
    assert "session_secret is too short" in msg and "at least 16 characters" in msg and "short\"" not in msg
    assert "set exactly one" in load_error(tmp_path, 'session_secret = "0123456789abcdefXYZ"\n'
                                                     'session_secret_file = "x"\n')
    assert "session_max_age" in load_error(tmp_path, "session_max_age = 0\n")
    assert load(tmp_path, "session_max_age = 600\n").session_max_age == 600
