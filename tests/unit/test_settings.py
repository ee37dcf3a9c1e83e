"""driver/settings.py: settings classes declared by their fields, loaded and checked by one loader."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from driver.errors import DriverError
from driver.settings import SettingsError, check, load, one_of, positive, read_secret, read_toml, setting
from transfer.errors import TemplateError


@dataclass(frozen=True)
class Demo:
    name: str = setting(hint="a name, not empty")
    mode: str = setting("a", hint="a or b", check=one_of("a", "b"))
    ratio: float = setting(1.0, hint="a number above 0", check=positive)
    count: int = setting(0, hint="a count")
    on: bool = setting(False, hint="true or false")
    path: str | None = setting(None, hint="a path")
    argv: tuple[str, ...] = setting(("x",), hint="a command line")
    token: str | None = setting(None, secret=True, hint="the token")
    extra: int = 7  # not a key: the caller gives it

    def __post_init__(self) -> None:
        check(self, "demo")


class OtherError(SettingsError):
    pass


def error_of(data: dict, **kw) -> str:
    with pytest.raises(SettingsError) as e:
        load(Demo, data, "demo", "/etc/demo.toml", **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_types_are_converted_and_defaults_kept():
    d = load(Demo, {"name": "n", "ratio": 2, "argv": ["a", "b"], "path": "/p"}, "demo", extra=9)
    assert (d.name, d.mode, d.ratio, d.argv, d.path, d.token, d.extra) == ("n", "a", 2.0, ("a", "b"), "/p", None, 9)
    assert isinstance(d.ratio, float)
    hash(d)


def test_one_line_naming_table_key_value_and_hint():
    assert error_of({"name": "n", "mode": "c"}) == "bad [demo] mode = 'c' in /etc/demo.toml: a or b"
    assert error_of({"name": "n", "ratio": 0}) == "bad [demo] ratio = 0 in /etc/demo.toml: a number above 0"


@pytest.mark.parametrize("key, value, expected", [
    ("count", True, "expected an integer"),  # a bool is never a number
    ("ratio", False, "expected a number"),
    ("count", 1.5, "expected an integer"),
    ("on", 1, "expected true or false"),
    ("path", 3, "expected a string"),
    ("argv", ["a", 1], "expected a list of strings"),
])
def test_types_are_checked(key, value, expected):
    assert f"bad [demo] {key} = {value!r} in /etc/demo.toml: {expected}, " in error_of({"name": "n", key: value})


def test_unknown_keys_list_the_known_ones():
    assert error_of({"name": "n", "nmae": "x", "extra": 1}) == (
        "[demo] has unknown key(s) extra, nmae in /etc/demo.toml: the known keys are argv, count, mode, name, "
        "on, path, ratio, token, token_file")


def test_missing_keys_and_non_tables():
    assert error_of({}) == "[demo] is missing name in /etc/demo.toml: a name, not empty"
    assert error_of([], label="[[demo]] entry 2").startswith("[[demo]] entry 2 is not a table in ")


def test_the_constructor_checks_and_load_names_the_file():
    with pytest.raises(SettingsError, match=r"^bad \[demo\] mode = 'z' in Demo\(\): a or b$"):
        Demo(name="n", mode="z")


def test_a_check_may_say_why_with_value_error():
    def even(v: int) -> bool:
        if v % 2:
            raise ValueError("an even count, e.g. 2")
        return True

    @dataclass(frozen=True)
    class Even:
        count: int = setting(0, hint="a count", check=even)

    with pytest.raises(SettingsError, match=r"bad \[e\] count = 3 in f: an even count, e.g. 2$"):
        load(Even, {"count": 3}, "e", "f")


def test_the_error_class_is_chosen_and_derives_from_the_bases():
    with pytest.raises(OtherError):
        load(Demo, {}, "demo", "f", error=OtherError)
    assert issubclass(SettingsError, DriverError) and issubclass(SettingsError, TemplateError)


def test_secret_inline_or_from_a_file_next_to_the_config(tmp_path):
    (tmp_path / "t").write_text("  from-file\n")
    source = str(tmp_path / "demo.toml")
    assert load(Demo, {"name": "n", "token_file": "t"}, "demo", source).token == "from-file"
    assert load(Demo, {"name": "n", "token": " inline "}, "demo", source).token == "inline"
    assert read_secret("[x]", "token", {"token_file": str(tmp_path / "t")}, "f") == "from-file"  # absolute
    assert read_secret("[x]", "token", {}, "f", required=False) is None
    assert "token = 'secret'" not in repr(load(Demo, {"name": "n", "token": "secret"}, "demo", source))


@pytest.mark.parametrize("data, words", [
    ({"token": "a", "token_file": "t"}, "[x] has both token and token_file in f: set exactly one"),
    ({}, "[x] has neither token nor token_file in f: set exactly one: token = \"...\" or token_file"),
    ({"token": " "}, "bad [x] token in f: a non-empty string"),
    ({"token_file": "missing"}, "[x] token_file: cannot read "),
    ({"token_file": "empty"}, "is empty in f: write the token into it"),
])
def test_secret_mistakes(tmp_path, data, words):
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SettingsError) as e:
        read_secret("[x]", "token", data, "f", str(tmp_path))
    assert words in str(e.value)


def test_read_toml(tmp_path):
    (tmp_path / "ok.toml").write_text("[a]\nb = 1\n")
    assert read_toml(str(tmp_path / "ok.toml"), "demo") == {"a": {"b": 1}}
    (tmp_path / "bad.toml").write_text("[a\n")
    with pytest.raises(SettingsError, match=r"^cannot read the demo configuration in .*bad.toml: "):
        read_toml(str(tmp_path / "bad.toml"), "demo")
