"""The cluster secret, and the TLS identities the control plane derives from it.

The first node of a cluster creates a secret (`$RINGLET_HOME/cluster.key`, mode 0600); every other node joins with
it (`ringlet node --join TOKEN` or `RINGLET_CLUSTER_KEY`; `ringlet cluster token` prints the token). zenoh's own TLS
with mutual authentication does the rest: each node derives the same certificate authority from the secret (an
Ed25519 key from HKDF of the secret, a self-signed certificate with fixed fields; Ed25519 signatures are
deterministic, so every node builds the same bytes) and signs a fresh certificate of its own with it. A peer
without the secret has no certificate the others accept: its connection fails in the TLS handshake, before it can
read or publish anything. No cipher here is ringlet's own: TLS is zenoh's (rustls), keys and certificates are
`cryptography`'s.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import logging
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

CLUSTER_KEY_ENV = "RINGLET_CLUSTER_KEY"
TOKEN_PREFIX = "ringlet1-"
SECRET_BYTES = 32
KEY_FILE = "cluster.key"


def token_of(secret: bytes) -> str:
    return TOKEN_PREFIX + base64.urlsafe_b64encode(secret).decode().rstrip("=")


def secret_of(token: str) -> bytes:
    """The secret a token carries; ValueError saying what a token looks like."""
    token = token.strip()
    body = token.removeprefix(TOKEN_PREFIX)
    try:
        secret = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        secret = b""
    if not token.startswith(TOKEN_PREFIX) or len(secret) != SECRET_BYTES:
        raise ValueError(f"that is not a ringlet cluster token (it starts with {TOKEN_PREFIX} and has 43 more "
                         "characters); print one with `ringlet cluster token` on a node of the cluster")
    return secret


def cluster_secret(home: Path, token: str | None = None) -> bytes:
    """The secret of this node's cluster: `token`'s (kept for the next start), else the one kept in
    `home/cluster.key`, else a new one (this node starts a cluster)."""
    path = home / KEY_FILE
    if token:
        secret = secret_of(token)
        if not path.exists() or _read(path) != secret:
            if path.exists():
                log.warning("joining another cluster: %s now holds its key (the old one is replaced)", path)
            _write(path, secret)
        return secret
    if path.exists():
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
            log.warning("%s was readable by other users; it is now readable by its owner only", path)
        return _read(path)
    secret = secrets.token_bytes(SECRET_BYTES)
    _write(path, secret)
    log.info("created this cluster's key in %s; other nodes join with `ringlet node --join TOKEN`, the TOKEN "
             "printed by `ringlet cluster token` here", path)
    return secret


def _read(path: Path) -> bytes:
    try:
        return secret_of(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} does not hold a cluster key ({error}); delete it to start a new cluster, or "
                         "join one with --join TOKEN") from None


def _write(path: Path, secret: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, not even once
    with os.fdopen(descriptor, "w") as file:
        file.write(token_of(secret) + "\n")
    path.chmod(0o600)


def _derived_key(secret: bytes, purpose: bytes) -> ed25519.Ed25519PrivateKey:
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"ringlet cluster", info=purpose).derive(secret)
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def cluster_authority(secret: bytes) -> tuple[ed25519.Ed25519PrivateKey, x509.Certificate]:
    """The certificate authority every node of the cluster derives alike from the secret."""
    key = _derived_key(secret, b"certificate authority")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ringlet cluster")])
    usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(1)
        .not_valid_before(datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, None)
    )
    return key, certificate


def node_identity(secret: bytes) -> tuple[bytes, bytes, bytes]:
    """PEM of (the cluster authority's certificate, a fresh private key of this node, its certificate signed by
    the authority)."""
    authority_key, authority = cluster_authority(secret)
    key = ed25519.Ed25519PrivateKey.generate()
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ringlet node")]))
        .issuer_name(authority.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("ringlet-node")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(authority_key, None)
    )
    pem = serialization.Encoding.PEM
    private = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return authority.public_bytes(pem), private, certificate.public_bytes(pem)


def zenoh_tls(secret: bytes) -> dict[str, object]:
    """zenoh's `transport/link/tls` settings: mutual TLS within the cluster. Names are not checked (nodes are
    reached at whatever address they have); the certificate's signature by the cluster's authority is the check."""
    authority, key, certificate = (base64.b64encode(pem).decode() for pem in node_identity(secret))
    return {"root_ca_certificate_base64": authority, "enable_mtls": True, "verify_name_on_connect": False,
            "listen_private_key_base64": key, "listen_certificate_base64": certificate,
            "connect_private_key_base64": key, "connect_certificate_base64": certificate}
