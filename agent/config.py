"""The agent's settings: the ``[agent]`` table of a TOML file, plus its driver's tables.

The ``[driver]`` table belongs to DriverConfig (driver/libvirt/config.py) and
``[xenserver]`` to XenServerSettings (driver/xenserver/config.py); this
module only adds where the agent listens, its token, the address other hosts
reach this one at, which driver to serve, and its TLS. With ``driver =
"xenserver"`` the ``[xenserver]`` table says where the (stubbed) host keeps its
SR; the SSH and transfer settings of ``[driver]`` serve its copier too. A
relative ``token_file`` or TLS file is relative to the configuration file's
directory.

The TLS files are checked here, when the file is read (readable, PEM, the key
the certificate's); whether a server may start without TLS (``plain_http``)
is checked when it starts (``serving_tls``). The controller's settings use
the same checks for its own TLS files.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from driver.libvirt.config import DriverConfig
from driver.settings import SettingsError, load, one_of, read_toml, setting
from driver.xenserver.config import XenServerSettings

DRIVERS = ("libvirt", "memory", "xenserver")
DEFAULT_PORT = 8797

#: The agent's configuration errors are the settings loader's: one line naming the key and the fix.
ConfigError = SettingsError

log = logging.getLogger(__name__)

#: How an operator gets certificates, for the errors that ask for them.
MAKE_CERTS = "make them with 'coldferry tls make-ca' and 'coldferry tls make-cert' (see 'coldferry tls --help')"


@dataclass(frozen=True)
class AgentConfig:
    """Where the agent listens and what it serves.

    ``address`` is the data-plane address other hosts use to reach this one
    over SSH when they copy disks here (the controller hands it to the
    source agent as ``dest``).
    """

    token: str = setting(secret=True, hint="the bearer token every request must present")
    listen: str = setting("0.0.0.0", hint='an address to bind, e.g. "0.0.0.0"', check=bool)
    port: int = setting(DEFAULT_PORT, hint="a TCP port, 1-65535", check=range(1, 65536).__contains__)
    address: str = setting(default_factory=lambda: os.uname().nodename, check=bool,
                           hint="this host's address for other hosts' SSH (data plane)")
    driver: str = setting("libvirt", hint=f"one of: {', '.join(DRIVERS)}", check=one_of(*DRIVERS))
    tls_cert: str | None = setting(None, hint="the agent's certificate, a PEM file (its chain may follow it), "
                                              "e.g. /etc/coldferry/tls/host1.pem")
    tls_key: str | None = setting(None, hint="the certificate's private key, an unencrypted PEM file, "
                                             "e.g. /etc/coldferry/tls/host1-key.pem")
    tls_client_ca: str | None = setting(None, hint="a CA certificate (PEM): then every client must present "
                                                   "a certificate it signed")
    plain_http: bool = setting(False, hint="true serves plain HTTP, the tokens crossing the network in the clear")
    driver_config: DriverConfig = field(default_factory=DriverConfig)
    xenserver: XenServerSettings = field(default_factory=XenServerSettings)

    @property
    def tls(self) -> ServerTLS | None:
        """The TLS the agent serves with, None without tls_cert."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return ServerTLS(self.tls_cert, self.tls_key, self.tls_client_ca)

    def serving_tls(self, source: str) -> ServerTLS | None:
        """``tls``, checked when the agent starts: None (plain HTTP) only with ``plain_http = true``.

        :raises ConfigError: neither tls_cert and tls_key nor plain_http = true.
        """
        return serving_tls("[agent]", self.tls, self.plain_http, source, ConfigError)

    @classmethod
    def load(cls, path: str) -> "AgentConfig":
        """Read ``[agent]``, ``[driver]`` and ``[xenserver]`` from a TOML file.

        :raises ConfigError: the file cannot be read or parsed, or a setting is
            unknown, missing or invalid.
        """
        return cls.from_dict(read_toml(path, "agent"), source=path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "configuration") -> "AgentConfig":
        """Build from a parsed TOML document (``{"agent": {...}, "driver": {...}}``); a relative
        ``token_file`` is read from the directory of ``source``.

        :raises ConfigError: as for ``load``.
        """
        driver_config = DriverConfig.from_dict(data.get("driver", {}), source)
        xenserver = XenServerSettings.from_dict(data.get("xenserver", {}), source)
        config = load(cls, data.get("agent", {}), "agent", source, driver_config=driver_config, xenserver=xenserver)
        base_dir = os.path.dirname(os.path.abspath(source))
        config = dataclasses.replace(config, **{key: tls_path(getattr(config, key), base_dir)
                                                for key in ("tls_cert", "tls_key", "tls_client_ca")})
        check_server_tls("[agent]", config.tls_cert, config.tls_key, config.plain_http, source, ConfigError,
                         client_ca=config.tls_client_ca)
        if config.driver == "xenserver" and not xenserver.sr_path:
            raise ConfigError(problem='[agent] driver = "xenserver" but [xenserver] has no sr_path', source=source,
                              hint='the SR directory of VHD files, e.g. "/var/lib/coldferry/sr"')
        return config


# TLS files: the agent's, and through the same checks the controller's ------------------------------

#: How long the agent and the controller keep an idle HTTP connection open. Longer than the
#: 5 s that clients poll at (openstack --wait, the controller's job polls): with uvicorn's
#: default of 5 s a poll could reuse a connection the server was closing at that moment.
KEEP_ALIVE_SECONDS = 75


@dataclass(frozen=True)
class ServerTLS:
    """What a server's TLS is made of: its certificate and key (PEM files) and the CA file a
    client's certificate must be signed by (None: clients need no certificate)."""

    cert: str
    key: str
    client_ca: str | None = None

    def uvicorn_options(self) -> dict[str, Any]:
        """The keywords of ``uvicorn.Config`` that serve this."""
        options: dict[str, Any] = {"ssl_certfile": self.cert, "ssl_keyfile": self.key}
        if self.client_ca is not None:
            options.update(ssl_ca_certs=self.client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        return options


def tls_path(path: str | None, base_dir: str) -> str | None:
    """``path`` with ``~`` expanded, relative to ``base_dir`` (the configuration file's directory)."""
    return None if path is None else os.path.join(base_dir, os.path.expanduser(path))


def check_server_tls(where: str, cert: str | None, key: str | None, plain_http: bool, source: str,
                     error: type[SettingsError], *, client_ca: str | None = None) -> None:
    """Check a server's settings ``tls_cert``, ``tls_key``, ``tls_client_ca`` and ``plain_http`` of
    the table ``where`` (``[agent]``), as far as the files go.

    :raises SettingsError: (or ``error``) the certificate without its key or the reverse, a client CA
        without them, TLS and plain_http both, or a file that cannot be read or used (check_key_pair).
    """
    check_key_pair(where, "tls_cert", "tls_key", cert, key, source, error)
    if cert is not None and plain_http:
        raise error(problem=f"{where} sets both tls_cert and plain_http = true", source=source,
                    hint="serve TLS (remove plain_http) or plain HTTP (remove the TLS keys), not both")
    if client_ca is not None:
        if cert is None:
            raise error(problem=f"{where} sets tls_client_ca without tls_cert and tls_key",
                        source=source, hint=f"client certificates need TLS: set those two as well; {MAKE_CERTS}")
        read_certificates(where, "tls_client_ca", client_ca, source, error)


def check_key_pair(where: str, cert_key: str, key_key: str, cert: str | None, key: str | None, source: str,
                   error: type[SettingsError]) -> None:
    """Check a certificate file and its key file, the settings ``cert_key`` and ``key_key`` of
    ``where``: both or neither, each a PEM file that parses, the key the certificate's, the
    certificate not expired.

    :raises SettingsError: (or ``error``) one line naming the setting and the file.
    """
    if (cert is None) != (key is None):
        given, missing = (cert_key, key_key) if cert is not None else (key_key, cert_key)
        raise error(problem=f"{where} sets {given} without {missing}", source=source,
                    hint=f"a certificate needs its key: set both; {MAKE_CERTS}")
    if cert is None or key is None:
        return
    certificate = read_certificates(where, cert_key, cert, source, error)[0]
    private = _read_key(where, key_key, key, source, error)
    if _public_der(private.public_key()) != _public_der(certificate.public_key()):
        raise error(problem=f"{where} {key_key} {key} is not the key of {cert_key} {cert}", source=source,
                    hint="give the key file made with that certificate")
    if certificate.not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc):
        raise error(problem=f"{where} {cert_key} {cert} expired on {certificate.not_valid_after_utc:%Y-%m-%d}",
                    source=source, hint=f"make a new one; {MAKE_CERTS}")


def read_certificates(where: str, name: str, path: str, source: str,
                      error: type[SettingsError]) -> list[x509.Certificate]:
    """The PEM certificates in ``path``, the setting ``name`` of ``where``; at least one.

    :raises SettingsError: (or ``error``) the file cannot be read or holds no PEM certificate.
    """
    data = _read_file(where, name, path, source, error)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise error(problem=f"{where} {name}: {path} holds no PEM certificate", source=source,
                    hint=f"a file beginning with -----BEGIN CERTIFICATE-----; {MAKE_CERTS}") from None


def serving_tls(where: str, tls: ServerTLS | None, plain_http: bool, source: str,
                error: type[SettingsError]) -> ServerTLS | None:
    """``tls`` when a server starts: plain HTTP (None) only when ``plain_http`` says so, with a warning.

    :raises SettingsError: (or ``error``) neither TLS nor plain_http = true.
    """
    if tls is not None:
        return tls
    if not plain_http:
        raise error(problem=f"{where} has neither tls_cert and tls_key nor plain_http = true", source=source,
                    hint=f"set tls_cert and tls_key ({MAKE_CERTS}), or plain_http = true to send the tokens "
                         "in the clear")
    log.warning("%s plain_http = true in %s: serving plain HTTP, so the bearer tokens cross the network in "
                "the clear; set tls_cert and tls_key instead", where, source)
    return None


def _read_file(where: str, name: str, path: str, source: str, error: type[SettingsError]) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise error(problem=f"{where} {name}: cannot read {path}", source=source,
                    hint=e.strerror or str(e)) from None


def _read_key(where: str, name: str, path: str, source: str, error: type[SettingsError]) -> Any:
    data = _read_file(where, name, path, source, error)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted: a daemon has no one to ask for the passphrase
        raise error(problem=f"{where} {name}: {path} is encrypted", source=source,
                    hint="give the key unencrypted (readable by the service's user only)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise error(problem=f"{where} {name}: {path} holds no PEM private key", source=source,
                    hint=f"a file beginning with -----BEGIN PRIVATE KEY-----; {MAKE_CERTS}") from None


def _public_der(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
