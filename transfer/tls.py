"""The direct TLS data channel: an ephemeral certificate, pinned by fingerprint.

The receiver makes a fresh key and self-signed certificate for each copy
and tells the sender its SHA-256 fingerprint over the authenticated SSH
session; the sender accepts exactly that certificate and nothing else. So
no CA is involved and no key material outlives the copy.

TLS 1.2 with ECDHE-ECDSA-AES128-GCM is preferred: AES-128-GCM runs on AES-NI
and TLS 1.3 in Python's ssl module offers no way to prefer it over AES-256.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import ssl
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .errors import ProtocolError

CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384"


def server_context() -> tuple[ssl.SSLContext, str]:
    """A server context with a new certificate, and that certificate's fingerprint."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coldferry-receiver")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .sign(key, hashes.SHA256()))
    der = cert.public_bytes(serialization.Encoding.DER)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    # load_cert_chain reads files only; they live a moment in a private directory.
    with tempfile.TemporaryDirectory(prefix="coldferry-tls-") as tmp:
        path = os.path.join(tmp, "cert.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        ctx.load_cert_chain(path)
    return ctx, hashlib.sha256(der).hexdigest()


def client_context() -> ssl.SSLContext:
    """A client context that checks the peer by pinned fingerprint (see ``check_peer``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # verified by fingerprint right after the handshake
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    return ctx


def check_peer(sock: ssl.SSLSocket, fingerprint: str) -> None:
    """Raise unless the peer's certificate has the SHA-256 ``fingerprint``."""
    der = sock.getpeercert(binary_form=True)
    got = hashlib.sha256(der or b"").hexdigest()
    if not hmac.compare_digest(got, fingerprint):
        raise ProtocolError(reason="the data channel's certificate is not the one the receiver "
                                   "announced over SSH; refusing to send (man in the middle?)")
