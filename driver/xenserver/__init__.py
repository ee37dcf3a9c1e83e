"""The XenServer driver: XenServer's VHD-chain migration behind a XenAPI-like session.

The session is stubbed: ``StubSession`` keeps real VHD files in an SR
directory and its records in a JSON file; no XenServer is contacted.
"""

from .config import XenServerSettings
from .copier import Copier, LocalCopier, StreamCopier
from .driver import XenServerDriver
from .session import Session, XenAPIFailure
from .stub_session import StubSession

__all__ = ["Copier", "LocalCopier", "Session", "StreamCopier", "StubSession", "XenAPIFailure", "XenServerDriver",
           "XenServerSettings"]
