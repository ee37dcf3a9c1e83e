"""Compute API microversions: the version documents, and the version each request asks for.

A request names its microversion in ``OpenStack-API-Version: compute X.Y`` or
``X-OpenStack-Nova-API-Version: X.Y`` (``latest`` is the maximum); without
either it is 2.1, as Nova's. Every answer under /v2.1 says which version it
was made for in both headers. The maximum stays below 2.88 so that hypervisor
replies keep their vcpus, memory and disk figures (2.88 drops them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from ..errors import BadRequest
from .errors import NovaError

PREFIX = "/v2.1"
_FORMAT = re.compile(r"^([1-9][0-9]*)\.(0|[1-9][0-9]*)$")
HEADER = "OpenStack-API-Version"
LEGACY_HEADER = "X-OpenStack-Nova-API-Version"
UPDATED = "2013-07-23T11:33:21Z"   # what Nova reports for v2.1


@dataclass(frozen=True, order=True)
class Version:
    """A microversion, ordered as numbers (2.9 < 2.10)."""

    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> "Version":
        """:raises BadRequest: not of the form MAJOR.MINOR."""
        m = _FORMAT.match(text.strip())
        if m is None:
            raise BadRequest(reason=f"API Version String {text!r} is of invalid format. Must be of format "
                                    "MajorNum.MinorNum.")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


MIN = Version(2, 1)
MAX = Version(2, 87)


def v(text: str) -> Version:
    """A version constant, e.g. ``v("2.53")``."""
    return Version.parse(text)


def requested(request: Request) -> Version:
    """The microversion ``request`` asks for.

    :raises BadRequest: a malformed version.
    :raises NovaError: a version outside MIN to MAX.
    """
    text = None
    for part in request.headers.get(HEADER, "").split(","):
        service, _, version = part.strip().partition(" ")
        if service.lower() == "compute" and version.strip():
            text = version.strip()
    text = text or request.headers.get(LEGACY_HEADER, "").strip() or None
    if text is None:
        return MIN
    if text.lower() == "latest":
        return MAX
    asked = Version.parse(text)
    if not MIN <= asked <= MAX:
        raise NovaError(status=406, reason=f"Version {asked} is not supported by the API. Minimum is {MIN} and "
                                   f"maximum is {MAX}.")
    return asked


def echo_headers(version: Version) -> dict[str, str]:
    """The headers every answer carries, naming the version it was made for."""
    return {HEADER: f"compute {version}", LEGACY_HEADER: str(version),
            "Vary": f"{HEADER}, {LEGACY_HEADER}"}


def current(request: Request) -> Version:
    """The request's microversion (a route's dependency), as the middleware read it."""
    version: Version = request.state.version
    return version


def url(request: Request, path: str = "") -> str:
    """The absolute URL of ``path`` under /v2.1, as the client reached the controller."""
    return f"{request.base_url}{PREFIX.lstrip('/')}/{path}"


def version_doc(request: Request) -> dict[str, Any]:
    """``GET /v2.1``: the one version served, as Nova describes it."""
    return {"version": {
        "id": "v2.1", "status": "CURRENT", "version": str(MAX), "min_version": str(MIN), "updated": UPDATED,
        "links": [{"rel": "self", "href": url(request)},
                  {"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"}],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.compute+json;version=2.1"}]}}
