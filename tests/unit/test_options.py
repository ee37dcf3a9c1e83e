"""CopyOptions: every setting of a copy checked once, a refusal naming the setting."""

from __future__ import annotations

import pytest

from transfer.errors import InvalidArgument
from transfer.options import MAX_STREAMS, CopyOptions

BAD = [
    ("method", "scp"), ("method", None),
    ("streams", 0), ("streams", MAX_STREAMS + 1), ("streams", "4"), ("streams", 2.0),
    ("channel", "udp"), ("channel", ""),
    ("compress", "zstd"), ("compress", False),
    ("bwlimit", -1), ("bwlimit", 1.5), ("bwlimit", None),
    ("retries", -1), ("retries", "3"),
    ("fsync", 1), ("fsync", "yes"),
]


@pytest.mark.parametrize("field, value", BAD)
def test_a_bad_value_is_refused_naming_its_field(field, value):
    with pytest.raises(InvalidArgument) as e:
        CopyOptions(**{field: value})
    assert (e.value.what, e.value.value) == (field, value)
    assert f"invalid {field}: {value!r}" in str(e.value)


@pytest.mark.parametrize("field", ["streams", "bwlimit", "retries"])
def test_bool_is_not_an_int(field):
    with pytest.raises(InvalidArgument, match="expected int") as e:
        CopyOptions(**{field: True})
    assert e.value.what == field


@pytest.mark.parametrize("limit", [1, 1023])
def test_rsync_refuses_a_limit_below_one_kib(limit):
    # rsync limits in whole KiB/s and reads 0 as "no limit": refuse rather than mislead.
    with pytest.raises(InvalidArgument, match="at least 1024 bytes") as e:
        CopyOptions(method="rsync", bwlimit=limit)
    assert e.value.what == "bwlimit"
    assert CopyOptions(method="stream", bwlimit=limit).bwlimit == limit


@pytest.mark.parametrize("values", [
    {}, {"method": "rsync"}, {"method": "rsync", "bwlimit": 1024},
    {"streams": 1}, {"streams": MAX_STREAMS}, {"channel": "tls"}, {"channel": "ssh"},
    {"compress": "fast"}, {"compress": "auto"}, {"bwlimit": 0}, {"bwlimit": 1},
    {"retries": 0}, {"retries": 10}, {"fsync": True},
])
def test_good_values_are_kept(values):
    options = CopyOptions(**values)
    assert all(getattr(options, k) == v for k, v in values.items())


def test_defaults():
    assert CopyOptions() == CopyOptions(method="stream", streams=2, channel="direct", compress="off",
                                        bwlimit=0, retries=3, fsync=False)


def test_from_settings_reads_the_prefixed_keys_and_ignores_others():
    settings = {"transfer_streams": 4, "transfer_method": "rsync", "transfer_bwlimit": 2048,
                "streams": 9, "ssh_port": 22}
    assert CopyOptions.from_settings(settings, "transfer_") == CopyOptions(method="rsync", streams=4,
                                                                           bwlimit=2048)
    assert CopyOptions.from_settings({}, "transfer_") == CopyOptions()


@pytest.mark.parametrize("key, value", [("transfer_streams", 17), ("transfer_channel", "udp"),
                                        ("transfer_fsync", "no"), ("transfer_retries", -2)])
def test_from_settings_names_the_setting(key, value):
    with pytest.raises(InvalidArgument, match=f"invalid {key}: ") as e:
        CopyOptions.from_settings({key: value}, "transfer_")
    assert (e.value.what, e.value.value) == (key, value)


def test_named_names_a_refused_value_with_the_prefix():
    with pytest.raises(InvalidArgument, match=r"invalid --streams: 0 \(use 1 to 16\)"):
        CopyOptions.named("--", streams=0)


def test_options_are_frozen():
    with pytest.raises(AttributeError):
        CopyOptions().streams = 8  # type: ignore[misc]


@pytest.mark.parametrize("options, method", [(CopyOptions(), "rsync"), (CopyOptions(method="rsync"), "stream")])
def test_a_copier_refuses_options_of_another_method(options, method):
    with pytest.raises(InvalidArgument, match=f"this is the {method} copier") as e:
        options.require(method)
    assert e.value.what == "method"
    CopyOptions(method=method).require(method)
