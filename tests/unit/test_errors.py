"""The one error base (transfer.errors.TemplateError) that every package's errors share."""

from __future__ import annotations

import pytest

from controller.errors import AgentError, ControllerError, NotFound
from driver.errors import DriverError, InsufficientSpace, MigrationFailed
from transfer.errors import InvalidArgument, TemplateError, TransferError


@pytest.mark.parametrize("cls", [TransferError, DriverError, ControllerError])
def test_every_package_derives_its_errors_from_the_one_base(cls):
    assert issubclass(cls, TemplateError) and cls.__init__ is TemplateError.__init__


def test_the_keywords_fill_the_template_and_become_attributes():
    e = InsufficientSpace(host="h2", path="/srv", uuid="u1", free_h="1 GiB", needed_h="2 GiB")
    assert str(e) == ("host h2 has 1 GiB free under /srv, instance u1 needs 2 GiB; "
                      "free space there or choose another host")
    assert (e.host, e.needed_h) == ("h2", "2 GiB")


def test_a_field_the_raise_left_out_still_gives_a_readable_message():
    e = MigrationFailed(uuid="u1", reason="disk full")
    assert str(e) == ("migration of instance u1 to <dest?> failed: disk full. "
                      "The source instance was restored<restored?>")


def test_conversions_and_format_specs_of_a_missing_field_do_not_fail():
    class Odd(TemplateError):
        msg = "{value!r} at {offset:>8} of {what.name}"
    text = str(Odd(value=3))
    assert text.startswith("{value!r} at {offset:>8} of {what.name}") and "value=3" in text
    assert str(InvalidArgument(what="streams", reason="use 1 to 16")) == "invalid streams: '<value?>' (use 1 to 16)"


def test_controller_errors_keep_their_status_and_own_constructors():
    assert AgentError(host="h1", reason="down").status == 502
    e = NotFound("migration", 7)
    assert (e.status, str(e)) == (404, "migration 7 not found")
