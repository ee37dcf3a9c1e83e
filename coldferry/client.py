"""The operator CLI's side of the controller HTTP API (docs/api.md, "Controller").

``ControllerClient`` has one method per endpoint and turns every failure into
``ClientError``. ``resolve_settings`` finds the controller's address, token and
CA file (flag, then environment, then the client config file). Commands get their
client from ``open_client`` and pass time through ``make_waiter``: the two
seams tests replace to inject an HTTP transport and a fake clock.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import math
import os
import ssl
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar
from urllib.parse import quote

import httpx

from coldferry.output import fail, format_option
from driver.settings import SettingsError, read_secret, read_secret_file

DEFAULT_URL = "https://127.0.0.1:8798"
DEFAULT_CONFIG = "~/.config/coldferry/client.toml"
URL_ENV = "COLDFERRY_URL"
TOKEN_ENV = "COLDFERRY_TOKEN"
CONFIG_ENV = "COLDFERRY_CLIENT_CONFIG"
CA_ENV = "COLDFERRY_CA_FILE"
CONFIG_KEYS = ("url", "token", "token_file", "ca_file")

T = TypeVar("T")

CONNECTION_HELP = f"""\
controller connection:
  Every command takes --url (env {URL_ENV}, default {DEFAULT_URL}),
  --token-file FILE (or env {TOKEN_ENV}) and --client-config FILE (env
  {CONFIG_ENV}, default {DEFAULT_CONFIG}: a [client] table with url, and
  token or token_file, and ca_file). A flag wins over the environment, the
  environment over the file; with no token anywhere, a terminal is asked for
  it. The token is never given on the command line, where every local user
  can read it (/proc/PID/cmdline). An https controller's certificate is
  checked against --ca-file FILE (env {CA_ENV}, config key ca_file, relative
  to the config file), else the system's trust store.
"""


class ClientError(Exception):
    """The controller refused a request, or could not be reached (``status`` None).

    ``str()`` is the controller's ``detail``, so commands print it as is.
    """

    def __init__(self, status: int | None, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail

    @property
    def transient(self) -> bool:
        """Worth retrying while polling: the controller was unreachable or failed inside."""
        return self.status is None or self.status >= 500


@dataclass(frozen=True)
class Settings:
    url: str
    token: str
    #: the CA certificate an https controller's certificate is checked against; None: the system's
    ca_file: str | None = None


# Settings ----------------------------------------------------------------------------------------

def _config_path(flag: str | None, env: Mapping[str, str]) -> tuple[Path, bool]:
    """The client config file and whether the operator named it (then it must exist)."""
    named = flag or env.get(CONFIG_ENV) or None
    return Path(os.path.expanduser(named or DEFAULT_CONFIG)), named is not None


def load_client_config(path: Path, required: bool) -> dict[str, str]:
    """The ``[client]`` table of ``path``; empty when the default file does not exist.

    Raises ClientError for a named file that is missing, bad TOML or unknown keys.
    """
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f).get("client", {})
    except FileNotFoundError:
        if required:
            raise ClientError(None, f"client config {path} does not exist") from None
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ClientError(None, f"cannot read client config {path}: {e}") from None
    unknown = sorted(set(table) - set(CONFIG_KEYS))
    if unknown:
        raise ClientError(None, f"unknown key {unknown[0]!r} in [client] of {path} "
                                f"(known: {', '.join(CONFIG_KEYS)})")
    return {k: str(v) for k, v in table.items()}


def _token_from_config(config: dict[str, str], path: Path) -> str | None:
    """``token`` or ``token_file`` of the ``[client]`` table, None when neither is set.

    A relative token_file sits next to the config file, wherever the command runs from.
    """
    try:
        return read_secret("[client]", "token", config, str(path), str(path.parent), required=False,
                           hint="the controller's API token")
    except SettingsError as e:
        raise ClientError(None, str(e)) from None


def _missing_token(path: Path) -> ClientError:
    return ClientError(None, f"no controller token: set the environment variable {TOKEN_ENV}, pass "
                             f"--token-file FILE, or put token (or token_file) in the [client] table of {path} "
                             f"(choose the file with --client-config or {CONFIG_ENV})")


def _token_file(path: str) -> str:
    """The token in the file named by --token-file; ClientError naming the file otherwise."""
    try:
        return read_secret_file(path, "--token-file", "the command line")
    except SettingsError as e:
        raise ClientError(None, f"{e.problem}: {e.hint}") from None


def _ask_token() -> str | None:
    """Ask a terminal for the token (not echoed); None when there is no terminal to ask."""
    if not sys.stdin.isatty():
        return None
    try:
        return getpass.getpass("controller token: ").strip() or None
    except (EOFError, KeyboardInterrupt):
        return None


def resolve_settings(url: str | None, token_file: str | None, config: str | None,
                     env: Mapping[str, str] = os.environ,
                     ask: Callable[[], str | None] = _ask_token, ca_file: str | None = None) -> Settings:
    """Each setting from its flag, else the environment, else the client config file; a token
    found nowhere is asked for on a terminal (``ask``).

    The file is read only when a flag and the environment leave something
    unset (the CA file counts for https URLs only), so a broken default file
    does not stand in the way of flags. A relative ca_file in the file is
    relative to the file's directory. Raises ClientError naming every way
    when no token is found.
    """
    url = url or env.get(URL_ENV) or None
    token = _token_file(token_file) if token_file else env.get(TOKEN_ENV) or None
    ca_file = ca_file or env.get(CA_ENV) or None
    path, named = _config_path(config, env)
    if url is None or token is None or (ca_file is None and not (url or "").startswith("http://")):
        file = load_client_config(path, required=named)
        url = url or file.get("url") or None
        token = token or _token_from_config(file, path)
        ca_file = ca_file or (os.path.join(path.parent, os.path.expanduser(file["ca_file"]))
                              if file.get("ca_file") else None)
    token = token or ask()
    if token is None:
        raise _missing_token(path)
    return Settings(url=(url or DEFAULT_URL).rstrip("/"), token=token, ca_file=ca_file)


class _RefuseToken(argparse.Action):
    """``--token VALUE``: refused, because every local user can read a command line."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"--token would show the token to every user of this host (/proc/PID/cmdline); "
                     f"set {TOKEN_ENV}, use --token-file FILE or the client config, or let the command ask")


def connection_options() -> argparse.ArgumentParser:
    """A parent parser with --url, --token-file and --client-config for every command that calls the API.

    The defaults are suppressed so a value given at any level of the command
    line is kept; ``client_from_args`` fills in the rest.
    """
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("controller connection (each: the flag, else the environment, "
                             "else the client config file)")
    g.add_argument("--url", default=argparse.SUPPRESS, metavar="URL",
                   help=f"controller address (env {URL_ENV}; config key url; default {DEFAULT_URL})")
    g.add_argument("--token-file", default=argparse.SUPPRESS, metavar="FILE",
                   help=f"a file holding the API token (else env {TOKEN_ENV}; else config key token or "
                        "token_file; else asked on a terminal)")
    g.add_argument("--token", action=_RefuseToken, default=argparse.SUPPRESS, metavar="TOKEN",
                   help=argparse.SUPPRESS)
    g.add_argument("--client-config", default=argparse.SUPPRESS, metavar="FILE",
                   help=f"TOML file with a [client] table (env {CONFIG_ENV}; default {DEFAULT_CONFIG})")
    g.add_argument("--ca-file", default=argparse.SUPPRESS, metavar="FILE",
                   help=f"the CA certificate (PEM) an https controller's certificate must be signed by (env "
                        f"{CA_ENV}; config key ca_file; default the system's trust store)")
    return p


# The HTTP client ---------------------------------------------------------------------------------

def _detail(response: httpx.Response) -> str:
    """The controller's ``detail``, or whatever a proxy in between answered."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, str) and detail:
        return detail
    if detail:
        return str(detail)
    text = response.text.strip()[:200]
    return f"HTTP {response.status_code} {response.reason_phrase}" + (f": {text}" if text else "")


class ControllerClient:
    """One method per controller endpoint; answers are the API's JSON objects.

    Every method raises ClientError: with the HTTP status and the controller's
    detail for a non-2xx answer, with status None when the controller cannot
    be reached or its certificate is not signed by the CA in ``ca_file``
    (None: the system's trust store) for the URL's host.
    """

    def __init__(self, url: str, token: str, http: httpx.Client | None = None, ca_file: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.ca_file = ca_file
        self._auth = {"Authorization": f"Bearer {token}"}
        self._http = http or httpx.Client(base_url=self.url, timeout=30.0, verify=_tls_context(ca_file))

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, json: Any = None,
              params: Mapping[str, Any] | None = None) -> Any:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(method, path, json=json, params=query, headers=self._auth)
        except httpx.ConnectError as e:
            if _untrusted(e):
                trust = f"the CA file {self.ca_file}" if self.ca_file else "the system's trust store"
                raise ClientError(None, f"the controller at {self.url} showed a certificate that {trust} does not "
                                        f"accept ({e}): give the CA that signed it with --ca-file, {CA_ENV} or "
                                        f"ca_file in the client config, and a URL whose host the certificate "
                                        f"names") from None
            raise ClientError(None, f"cannot connect to the controller at {self.url} ({e}); is it running? "
                                    f"Point to it with --url, {URL_ENV} or url in the client config") from None
        except httpx.TimeoutException:
            raise ClientError(None, f"the controller at {self.url} did not answer in time") from None
        except httpx.HTTPError as e:
            raise ClientError(None, f"request to the controller at {self.url} failed: {e}") from None
        if not response.is_success:
            raise ClientError(response.status_code, _detail(response))
        try:
            return response.json()
        except ValueError:
            raise ClientError(response.status_code, f"the controller at {self.url} answered "
                                                    f"{method} {path} with something other than JSON") from None

    # Servers

    def servers(self, host: str | None = None) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/servers", params={"host": host})["servers"]

    def server(self, server: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/servers/{_seg(server)}")

    def _action(self, server: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", f"/v1/servers/{_seg(server)}/action", json=body)["migration"]

    def migrate(self, server: str, host: str | None = None, force: bool = False) -> dict[str, Any]:
        """Start a cold migration; returns the new migration record."""
        return self._action(server, {"migrate": {"host": host, "force": force}})

    def confirm_resize(self, server: str) -> dict[str, Any]:
        return self._action(server, {"confirmResize": None})

    def revert_resize(self, server: str) -> dict[str, Any]:
        return self._action(server, {"revertResize": None})

    # Hosts

    def check_destination(self, host: str, server: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/os-hosts/{_seg(host)}/check-destination", params={"server": server})

    def hypervisors(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/os-hypervisors")["hypervisors"]

    def hypervisor(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/os-hypervisors/{_seg(name)}")

    def set_service(self, host: str, enabled: bool, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"status": "enabled" if enabled else "disabled"}
        if reason is not None:
            body["disabled_reason"] = reason
        return self._call("PUT", f"/v1/os-services/{_seg(host)}", json=body)

    # Migrations

    def migrations(self, *, host: str | None = None, status: str | None = None, server: str | None = None,
                   migration_type: str | None = None, changes_since: str | None = None) -> list[dict[str, Any]]:
        """Migration records, newest first; filters left None are not sent."""
        params = {"host": host, "status": status, "server": server, "migration_type": migration_type,
                  "changes-since": changes_since}
        return self._call("GET", "/v1/os-migrations", params=params)["migrations"]

    def migration(self, id: int) -> dict[str, Any]:
        return self._call("GET", f"/v1/os-migrations/{int(id)}")

    def confirm_migration(self, id: int) -> dict[str, Any]:
        return self._call("POST", f"/v1/os-migrations/{int(id)}/confirm")

    def revert_migration(self, id: int) -> dict[str, Any]:
        return self._call("POST", f"/v1/os-migrations/{int(id)}/revert")

    def recover_migration(self, id: int) -> dict[str, Any]:
        """Take a migration out of needs-recovery (409 while a host still does not answer)."""
        return self._call("POST", f"/v1/os-migrations/{int(id)}/recover")

    # Drains

    def drain(self, host: str, live: bool = False, max_servers: int = 1, dry_run: bool = False,
              target_host: str | None = None, force: bool = False) -> dict[str, Any]:
        """Start moving every server off ``host`` (or plan it, with dry_run); returns the Drain."""
        body: dict[str, Any] = {"live": live, "max_servers": max_servers, "dry_run": dry_run, "force": force}
        if target_host is not None:
            body["target_host"] = target_host
        return self._call("POST", f"/v1/os-hypervisors/{_seg(host)}/drain", json=body)

    def drains(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/drains")["drains"]

    def drain_status(self, id: int) -> dict[str, Any]:
        return self._call("GET", f"/v1/drains/{int(id)}")


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """A context that checks the controller's certificate against ``ca_file`` (None: the system's store)."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as e:  # FileNotFoundError, or no PEM certificate in it
        raise ClientError(None, f"cannot use the CA file {ca_file} (--ca-file, {CA_ENV} or ca_file in the "
                                f"client config): {getattr(e, 'strerror', None) or e}") from None


def _untrusted(error: BaseException) -> bool:
    """Whether a certificate check failed behind a connection error."""
    seen: BaseException | None = error
    while seen is not None and not isinstance(seen, ssl.SSLCertVerificationError):
        seen = seen.__cause__ or seen.__context__
    return seen is not None


def _seg(name: str) -> str:
    """One path segment: a server or host name must not be able to reach another endpoint."""
    return quote(name, safe="")


# Waiting -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Waiter:
    """How the --wait loops pass time; tests swap in a fake clock and sleep."""

    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    interval: float = 1.0
    # Polling outlives controller restarts: this many failed polls in a row end the wait.
    tolerated_failures: int = 5

    def poll(self, fetch: Callable[[], T], done: Callable[[T], bool], timeout: float,
             on_update: Callable[[T], None]) -> T:
        """Fetch every ``interval`` until ``done`` or ``timeout`` seconds pass; return the last value.

        The caller tells a timeout from completion with ``done(value)``.
        The loop is bounded by the poll count as well as the clock, so a
        clock that stands still cannot keep it going.
        """
        deadline = self.clock() + timeout
        for _ in range(max(1, math.ceil(timeout / self.interval)) + 1):
            value = self._fetch(fetch)
            on_update(value)
            if done(value) or self.clock() >= deadline:
                break
            self.sleep(min(self.interval, max(0.0, deadline - self.clock())))
        return value

    def _fetch(self, fetch: Callable[[], T]) -> T:
        for attempt in range(1, self.tolerated_failures + 1):
            try:
                return fetch()
            except ClientError as e:
                if not e.transient or attempt == self.tolerated_failures:
                    raise
                print(f"coldferry: warning: {e}; retrying", file=sys.stderr)
                self.sleep(self.interval)
        raise AssertionError("unreachable")


# The seams ---------------------------------------------------------------------------------------

def open_client(url: str, token: str, ca_file: str | None = None) -> ControllerClient:
    """The client every command uses; tests replace this to inject an HTTP transport."""
    return ControllerClient(url, token, ca_file=ca_file)


def make_waiter() -> Waiter:
    """The clock every --wait uses; tests replace this so waits take no time."""
    return Waiter()


def client_from_args(args: argparse.Namespace) -> ControllerClient:
    settings = resolve_settings(getattr(args, "url", None), getattr(args, "token_file", None),
                                getattr(args, "client_config", None), ca_file=getattr(args, "ca_file", None))
    return open_client(settings.url, settings.token, settings.ca_file)


Command = Callable[[argparse.Namespace, ControllerClient], int]


def with_client(run: Command) -> Callable[[argparse.Namespace], int]:
    """Turn ``run(args, client)`` into an argparse ``func``: connect, run, report errors as the CLI does."""

    @functools.wraps(run)
    def command(args: argparse.Namespace) -> int:
        try:
            client = client_from_args(args)
        except ClientError as e:
            return fail(str(e))
        try:
            return run(args, client)
        except ClientError as e:
            return fail(_with_hint(e))
        except KeyboardInterrupt:
            print("coldferry: interrupted; what the controller had accepted goes on there", file=sys.stderr)
            return 130
        finally:
            client.close()

    return command


def add_command(sub: argparse._SubParsersAction, name: str, run: Command, summary: str,
                description: str) -> argparse.ArgumentParser:
    """A command that calls the controller: connection options, -f, and errors reported as the CLI does."""
    p = sub.add_parser(name, help=summary, description=description,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       parents=[connection_options(), format_option()])
    p.set_defaults(func=with_client(run))
    return p


def add_group(sub: argparse._SubParsersAction, name: str, summary: str,
              description: str) -> argparse._SubParsersAction:
    """A command group (``server``, ``host``): its help names the connection settings every command takes."""
    group = sub.add_parser(name, help=summary, description=description, epilog=CONNECTION_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    return group.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)


def add_wait_options(p: argparse.ArgumentParser, what: str, timeout: int) -> None:
    p.add_argument("--wait", action="store_true", help=what)
    p.add_argument("--timeout", type=_positive, default=timeout, metavar="S",
                   help="with --wait: stop waiting after S seconds; the work goes on (default: %(default)s)")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than zero")
    return value


def _with_hint(e: ClientError) -> str:
    if e.status == 401:
        return f"{e} (check the token: --token, {TOKEN_ENV} or the client config)"
    return str(e)
