"""The transfer package's errors.

Every error carries a message template filled from its own attributes, so a
raise reads ``raise NoSpace(path=..., needed=..., free=...)`` and the text
says what went wrong and what to do about it.
"""

from __future__ import annotations

from typing import Any


class _Lenient(dict):
    """Template fields the raise did not give show as ``<name?>`` instead of failing."""

    def __missing__(self, key: str) -> str:
        return f"<{key}?>"


class TemplateError(Exception):
    """Base of every coldferry error (transfer, driver, controller): a message template
    filled from the error's own attributes.

    A subclass sets ``msg``; a raise gives the template's fields as keywords,
    which also become attributes. A field the raise left out shows as
    ``<name?>``, so a mistake in a raise still gives a readable message.
    """

    msg = "{reason}"

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)
        try:
            text = self.msg.format_map(_Lenient(kwargs))
        except (AttributeError, IndexError, KeyError, ValueError, TypeError):
            text = f"{self.msg} ({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
        super().__init__(text)


class TransferError(TemplateError):
    """Base of every transfer failure."""

    msg = "transfer failed: {reason}"
    #: Whether a retry after reconnecting may succeed (a dropped connection).
    retryable = False

    def to_dict(self) -> dict[str, Any]:
        """The error as sent over the control channel."""
        return {"op": "error", "kind": type(self).__name__, "message": str(self)}


class InvalidArgument(TransferError):
    msg = "invalid {what}: {value!r} ({reason})"


class SourceError(TransferError):
    msg = "cannot read source {path}: {reason}"


class HostKeyError(TransferError):
    msg = ("host key of {host} is not trusted: {reason}. Add the host's key to "
           "{known_hosts} (for example with ssh-keyscan, after checking its "
           "fingerprint); coldferry never adds keys by itself")


class AuthenticationFailed(TransferError):
    msg = "cannot log in to {host} as {user}: {reason}. Check --identity and the host's authorized_keys"


class ConnectionLost(TransferError):
    msg = "connection to {host} lost: {reason}"
    retryable = True


class RemoteCommandFailed(TransferError):
    msg = ("the receiver on {host} did not start ({command!r}): {reason}. Is coldferry "
           "installed there and the command right (--remote-command)?")


class ProtocolError(TransferError):
    msg = "protocol error: {reason}"


class PathRefused(TransferError):
    msg = "refused path {name!r} under {root}: {reason}"


class TargetExists(TransferError):
    msg = ("{path} already exists on the receiving host; pass --overwrite to replace "
           "it (a copy interrupted earlier is resumed automatically)")


class UnsafeFile(TransferError):
    msg = ("refused to write {path}: {reason}; coldferry writes only to a file of its own, "
           "remove it and copy again")


class StaleResume(TransferError):
    msg = ("{path} holds an interrupted copy of a different source ({reason}); pass "
           "--overwrite to start over")


class NoSpace(TransferError):
    msg = ("not enough free space for {path}: the copy needs {needed_h}, {free_h} is "
           "free on the receiving filesystem; free space or choose another target")


class ChunkCorrupted(TransferError):
    msg = ("data at offset {offset} (length {length}) arrived corrupted ({reason}); "
           "the copy was stopped, the source is untouched")


class DigestMismatch(TransferError):
    msg = ("image digest differs after copying {path}: sender {sender}, receiver "
           "{receiver}; the incomplete target was removed, the source is untouched")


class RemoteError(TransferError):
    """An error the receiver reported; ``kind`` is its class name there."""

    msg = "receiver on {host}: {message}"


class RsyncFailed(TransferError):
    msg = "rsync failed with exit code {code}: {meaning}{detail}"


def from_remote(kind: str, message: str, host: str) -> TransferError:
    """Rebuild an error the receiver reported, keeping its class where we know it."""
    cls = next((c for c in _all_errors() if c.__name__ == kind), None)
    if cls is None:
        return RemoteError(host=host, message=message)
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.remote_host = host
    return exc


def _all_errors() -> list[type[TransferError]]:
    out, todo = [], [TransferError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out
