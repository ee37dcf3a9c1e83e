"""``/os-migrations``: the controller's migration records with Nova's names and filters.

The statuses are the controller's (docs/api.md): Nova's, plus ``rolling-back``
and ``needs-recovery``. Fields Nova has and coldferry does not (flavor ids,
user and project) are null.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from ..errors import BadRequest
from ..records import MigrationRecord, MigrationStatus, MigrationType, isotime
from ..store import Store
from .versions import Version, current, url, v


def router(store: Store) -> APIRouter:
    """``GET /os-migrations`` over ``store``."""
    api = APIRouter()

    @api.get("/os-migrations")
    def list_migrations(request: Request, version: Version = Depends(current),
                        instance_uuid: str | None = None, host: str | None = None, status: str | None = None,
                        migration_type: str | None = None, source_compute: str | None = None,
                        changes_since: str | None = Query(None, alias="changes-since"),
                        changes_before: str | None = Query(None, alias="changes-before"),
                        limit: int | None = Query(None, ge=0), marker: str | None = None) -> dict[str, Any]:
        if (status is not None and status not in set(MigrationStatus)) or \
                (migration_type is not None and migration_type not in set(MigrationType)):
            return {"migrations": []}   # Nova filters on any value: an unknown one matches nothing
        found = store.list_migrations(
            host=host, status=None if status is None else MigrationStatus(status), server=instance_uuid,
            migration_type=None if migration_type is None else MigrationType(migration_type),
            changes_since=_time("changes-since", changes_since) if changes_since else None)
        if changes_before:
            before = _time("changes-before", changes_before)
            found = [m for m in found if m.updated_at <= before]
        if source_compute:
            found = [m for m in found if m.source_compute == source_compute]
        if marker and version >= v("2.59"):
            ids = [m.uuid for m in found]
            if marker not in ids:
                raise BadRequest(reason=f"Marker {marker} could not be found.")
            found = found[ids.index(marker) + 1:]
        if limit is not None and version >= v("2.59"):
            found = found[:limit]
        return {"migrations": [view(request, m, version) for m in found]}

    return api


def view(request: Request, m: MigrationRecord, version: Version) -> dict[str, Any]:
    """One migration as Nova's ``GET /os-migrations`` lists it at ``version``."""
    out: dict[str, Any] = {
        "id": m.id, "source_node": m.source_compute, "dest_node": m.dest_compute,
        "source_compute": m.source_compute, "dest_compute": m.dest_compute, "dest_host": m.dest_address,
        "status": str(m.status), "instance_uuid": m.server, "old_instance_type_id": None,
        "new_instance_type_id": None, "created_at": isotime(m.created_at), "updated_at": isotime(m.updated_at)}
    if version >= v("2.23"):
        out["migration_type"] = str(m.migration_type)
        if m.migration_type == MigrationType.LIVE and m.status == MigrationStatus.MIGRATING:
            href = url(request, f"servers/{m.server}/migrations/{m.id}")
            out["links"] = [{"rel": "self", "href": href}, {"rel": "bookmark", "href": href}]
    if version >= v("2.59"):
        out["uuid"] = m.uuid
    if version >= v("2.80"):
        out["user_id"] = out["project_id"] = None
    return out


def _time(name: str, text: str) -> dt.datetime:
    """An ISO 8601 query value as an aware UTC time (UTC when it names no zone).

    :raises BadRequest: not a time, or out of range, naming the parameter as Nova does.
    """
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)
    except (ValueError, OverflowError):
        raise BadRequest(reason=f"Invalid input for query parameters {name}. Value: {text}. "
                                f"{text} is not a 'date-time'") from None
