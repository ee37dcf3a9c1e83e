"""The request bodies /v2.1 accepts, strict and closed as Nova's JSON schemas are."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.app import validation_reason

from ..errors import BadRequest

B = TypeVar("B", bound="Body")


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MigrateArgs(Body):
    """``{"migrate": {"host": ...}}`` (``host`` from 2.56), or ``{"migrate": null}``."""

    host: str | None = None


class LiveArgs(Body):
    """``{"os-migrateLive": {...}}``; ``disk_over_commit`` (before 2.25) and ``force`` (2.30 to 2.67)
    are accepted as Nova's versions had them."""

    host: str | None
    block_migration: bool | Literal["auto"] = "auto"
    disk_over_commit: bool | None = None
    force: bool = False


class ServiceUpdate(Body):
    """``PUT /os-services/{id}`` from 2.53."""

    status: Literal["enabled", "disabled"] | None = None
    disabled_reason: str | None = Field(None, min_length=1, max_length=255)
    forced_down: bool | None = None


class LegacyServiceUpdate(Body):
    """``PUT /os-services/{enable,disable,disable-log-reason}`` before 2.53."""

    host: str
    binary: str
    disabled_reason: str | None = Field(None, min_length=1, max_length=255)


def parse(model: type[B], data: Any, field: str = "body") -> B:
    """``data`` as ``model``.

    :raises BadRequest: in Nova's words, naming the field and why.
    """
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise BadRequest(reason=f"Invalid input for field/attribute {field}: "
                                + validation_reason(e.errors())) from None
