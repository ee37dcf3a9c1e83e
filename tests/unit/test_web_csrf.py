"""The CSRF token: made once per session, checked in constant time, new at every login."""

from __future__ import annotations

from typing import Any

from controller.web import csrf


def test_a_session_gets_one_token_and_keeps_it() -> None:
    session: dict[str, Any] = {}
    first = csrf.token(session)
    assert len(first) >= 40 and csrf.token(session) == first


def test_sessions_get_different_tokens() -> None:
    assert csrf.token({}) != csrf.token({})


def test_a_form_with_the_token_is_valid() -> None:
    session: dict[str, Any] = {}
    assert csrf.valid(session, {csrf.FIELD: csrf.token(session)})


def test_a_form_without_or_with_another_token_is_not() -> None:
    session: dict[str, Any] = {}
    good = csrf.token(session)
    assert not csrf.valid(session, {})
    assert not csrf.valid(session, {csrf.FIELD: ""})
    assert not csrf.valid(session, {csrf.FIELD: good[:-1]})
    assert not csrf.valid(session, {csrf.FIELD: csrf.token({})})
    assert not csrf.valid(session, {"other": good})


def test_a_session_without_a_token_accepts_nothing() -> None:
    assert not csrf.valid({}, {csrf.FIELD: ""})
    assert not csrf.valid({}, {csrf.FIELD: "anything"})
    assert not csrf.valid({"csrf": 5}, {csrf.FIELD: "5"})


def test_rotate_makes_the_old_token_worthless() -> None:
    session: dict[str, Any] = {}
    old = csrf.token(session)
    new = csrf.rotate(session)
    assert new != old and csrf.token(session) == new
    assert not csrf.valid(session, {csrf.FIELD: old}) and csrf.valid(session, {csrf.FIELD: new})
