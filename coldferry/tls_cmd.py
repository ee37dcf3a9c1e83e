"""``coldferry tls``: a small CA for a lab or a handful of hosts, and the certificates it signs.

``make_ca`` writes ``ca.pem`` and ``ca-key.pem`` (0600) into a directory;
``make_cert`` signs a server certificate (SAN entries for the names and
addresses clients use) or a client certificate with it, written as
``PREFIX.pem`` and ``PREFIX-key.pem`` (0600). Keys are ECDSA P-256 (or RSA
2048); the clock is a parameter.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coldferry.output import fail

KEY_TYPES = ("ec", "rsa")
CA_DAYS = 5 * 365
CERT_DAYS = 365
# A clock a little behind the host's must not find a fresh certificate not yet valid.
_BACKDATE = datetime.timedelta(minutes=5)

HELP = """\
Make a small certificate authority and the certificates of the controller and
the agents, so that they speak TLS and check each other (the [agent] and
[controller] TLS settings, README "Configuration"). For a lab or a handful of
hosts; where a company CA exists, use its certificates instead.

steps:
  1. once, on a safe machine:
       coldferry tls make-ca /etc/coldferry/ca
     writes ca.pem (give it to everyone who checks a certificate) and
     ca-key.pem (0600; it signs certificates: keep it there, never on a host).
  2. per agent host, with the name and address the controller's agent_url uses:
       coldferry tls make-cert --ca /etc/coldferry/ca --name host1 --ip 198.18.0.11 host1
     writes host1.pem and host1-key.pem; copy them to the host and set
     tls_cert and tls_key in its [agent] table.
  3. for the controller, with every name and address the CLI and browsers use:
       coldferry tls make-cert --ca /etc/coldferry/ca --name controller --dns ctl.example --ip 127.0.0.1 controller
     and set tls_cert, tls_key and agent_ca = "ca.pem" in [controller].
  4. optionally a client certificate for the controller, so the agents accept
     the controller only (tls_client_ca = "ca.pem" in each [agent]):
       coldferry tls make-cert --ca /etc/coldferry/ca --name controller --client controller-client
     and set agent_client_cert and agent_client_key in [controller].
  5. the CLI checks the controller against the CA: --ca-file ca.pem, env
     COLDFERRY_CA_FILE, or ca_file in the client config.
"""


class TLSCommandError(Exception):
    """A certificate cannot be made: the message says why and what to do."""


@dataclass(frozen=True)
class Issued:
    """The files of a certificate and its key."""

    cert: Path
    key: Path


def ca_files(directory: Path) -> Issued:
    """Where a CA made by ``make_ca`` in ``directory`` keeps its certificate and key."""
    return Issued(directory / "ca.pem", directory / "ca-key.pem")


def make_ca(directory: Path, *, name: str = "coldferry CA", days: int = CA_DAYS, key_type: str = "ec",
            now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc)) -> Issued:
    """A new CA in ``directory`` (made 0700 if missing): ``ca.pem`` and ``ca-key.pem`` (0600).

    :raises TLSCommandError: either file exists already (a new CA would orphan every certificate
        the old one signed), or ``days`` is below 1.
    """
    _check_days(days)
    files = ca_files(directory)
    _refuse_existing(files, "remove them first: every certificate the old CA signed must then be made again")
    key = _new_key(key_type)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = now() - _BACKDATE
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write(files, cert, key)
    return files


def make_cert(ca_dir: Path, name: str, out_prefix: Path, *, dns: Sequence[str] = (), ips: Sequence[str] = (),
              client: bool = False, days: int = CERT_DAYS, key_type: str = "ec", replace: bool = False,
              now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc)) -> Issued:
    """A certificate for ``name`` signed by the CA in ``ca_dir``: ``<out_prefix>.pem`` and
    ``<out_prefix>-key.pem`` (0600).

    :param dns: host names a client may use; a server certificate also names ``name`` itself
        (as an IP address when it is one).
    :param ips: IP addresses a client may use.
    :param client: a client certificate (no names besides ``name``) instead of a server's.
    :param replace: overwrite the files of an earlier certificate.
    :raises TLSCommandError: the CA cannot be read, an address is not one, the files exist, or
        ``days`` is below 1.
    """
    _check_days(days)
    ca_cert, ca_key = _load_ca(ca_dir)
    files = Issued(Path(f"{out_prefix}.pem"), Path(f"{out_prefix}-key.pem"))
    if not replace:
        _refuse_existing(files, "remove them, or give --replace to make a new certificate in their place")
    key = _new_key(key_type)
    start = now() - _BACKDATE
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(min(start + datetime.timedelta(days=days),
                                                            ca_cert.not_valid_after_utc))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=key_type == "rsa", data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False, crl_sign=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if not client:
        builder = builder.add_extension(x509.SubjectAlternativeName(_alt_names(name, dns, ips)), critical=False)
    _write(files, builder.sign(ca_key, hashes.SHA256()), key, replace=replace)
    return files


def _alt_names(name: str, dns: Sequence[str], ips: Sequence[str]) -> list[x509.GeneralName]:
    """The SAN entries of a server certificate: ``name``, the host names, the addresses; each once."""
    entries: list[x509.GeneralName] = []
    for value in [name, *dns, *ips]:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            if value in ips:
                raise TLSCommandError(f"--ip {value!r} is not an IP address (give host names with --dns)") from None
            entry = x509.DNSName(value)
        if entry not in entries:
            entries.append(entry)
    return entries


def _check_days(days: int) -> None:
    if days < 1:
        raise TLSCommandError(f"--days {days}: a certificate must be valid for a day at least")


def _new_key(key_type: str) -> Any:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise TLSCommandError(f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, Any]:
    files = ca_files(ca_dir)
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except OSError as e:
        raise TLSCommandError(f"cannot read the CA in {ca_dir}: {e.strerror or e} ({e.filename}); make one with "
                              f"'coldferry tls make-ca {ca_dir}'") from None
    except (ValueError, TypeError) as e:
        raise TLSCommandError(f"the CA in {ca_dir} is not one 'coldferry tls make-ca' made: {e}") from None
    return cert, key


def _refuse_existing(files: Issued, fix: str) -> None:
    existing = [str(p) for p in (files.cert, files.key) if p.exists()]
    if existing:
        raise TLSCommandError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: {fix}")


def _write(files: Issued, cert: x509.Certificate, key: Any, replace: bool = False) -> None:
    """The key first, created 0600 (never readable by others, not even for a moment), then the certificate."""
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    try:
        with open(os.open(files.key, flags, 0o600), "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(pem_key)
        with open(os.open(files.cert, flags, 0o644), "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
    except OSError as e:
        raise TLSCommandError(f"cannot write {e.filename}: {e.strerror or e}") from None


# The command line ------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:
    """Add ``tls make-ca`` and ``tls make-cert`` to the ``coldferry`` command line."""
    p = sub.add_parser("tls", help="make a small CA and the controller's and agents' certificates",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="tls_command", metavar="COMMAND", required=True)
    ca = commands.add_parser("make-ca", help="make a CA: DIR/ca.pem and DIR/ca-key.pem (0600)",
                             description="Make a certificate authority: DIR/ca.pem (hand it out) and DIR/ca-key.pem "
                                         "(0600; it signs certificates, keep it off the hosts). DIR is made 0700 "
                                         "when missing. Refuses to replace an existing CA.")
    ca.add_argument("directory", metavar="DIR", type=Path)
    ca.add_argument("--name", default="coldferry CA", help="the CA's common name (default: %(default)s)")
    ca.add_argument("--days", type=int, default=CA_DAYS, help="days it is valid (default: %(default)s)")
    ca.add_argument("--key-type", choices=KEY_TYPES, default="ec", help="ECDSA P-256 (ec, default) or RSA 2048")
    ca.set_defaults(func=_run_make_ca)
    cert = commands.add_parser("make-cert", help="make a server (or --client) certificate signed by the CA",
                               description="Make OUT_PREFIX.pem and OUT_PREFIX-key.pem (0600), signed by the CA in "
                                           "--ca. A server certificate names --name and every --dns and --ip: give "
                                           "each name and address clients use in their URLs (agent_url, --url).")
    cert.add_argument("out_prefix", metavar="OUT_PREFIX", type=Path, help="e.g. /etc/coldferry/tls/host1")
    cert.add_argument("--ca", required=True, metavar="DIR", type=Path, help="the directory of ca.pem and ca-key.pem")
    cert.add_argument("--name", required=True, help="the common name: the host's name, or the client's")
    cert.add_argument("--dns", action="append", default=[], metavar="NAME", help="a host name clients use (repeat)")
    cert.add_argument("--ip", action="append", default=[], metavar="ADDR", help="an IP address clients use (repeat)")
    cert.add_argument("--client", action="store_true", help="a client certificate (the controller's to the agents)")
    cert.add_argument("--days", type=int, default=CERT_DAYS, help="days it is valid (default: %(default)s)")
    cert.add_argument("--key-type", choices=KEY_TYPES, default="ec", help="ECDSA P-256 (ec, default) or RSA 2048")
    cert.add_argument("--replace", action="store_true", help="overwrite the files of an earlier certificate")
    cert.set_defaults(func=_run_make_cert)


def _run_make_ca(args: argparse.Namespace) -> int:
    try:
        files = make_ca(args.directory, name=args.name, days=args.days, key_type=args.key_type)
    except TLSCommandError as e:
        return fail(str(e))
    print(f"CA certificate {files.cert}\nCA key {files.key} (keep it private)\n"
          f"next: coldferry tls make-cert --ca {args.directory} --name HOST --ip ADDR OUT_PREFIX")
    return 0


def _run_make_cert(args: argparse.Namespace) -> int:
    try:
        files = make_cert(args.ca, args.name, args.out_prefix, dns=args.dns, ips=args.ip, client=args.client,
                          days=args.days, key_type=args.key_type, replace=args.replace)
    except TLSCommandError as e:
        return fail(str(e))
    settings = ("agent_client_cert and agent_client_key in [controller]" if args.client
                else "tls_cert and tls_key in [agent] or [controller]")
    print(f"certificate {files.cert}\nkey {files.key}\nset them as {settings}")
    return 0
