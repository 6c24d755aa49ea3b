"""`gradpool certs DIR`: a development CA and the certificates a TLS cluster needs.

    gradpool certs certs/                 certs/ca.pem, coordinator.pem, worker.pem, client.pem (+ -key.pem)
    gp.make_dev_certs("certs")            the same from Python (LocalCluster(tls="certs") uses them)

Every certificate is signed by the new CA (ca-key.pem: keep it or delete it;
nothing at run time needs it). The coordinator's and the workers' certificates
name localhost, 127.0.0.1, ::1 and the compose service names (`coordinator`,
`worker`), plus any `--host`, and may serve (serverAuth) and call
(clientAuth: a coordinator or worker presents its own certificate to its
peers under mTLS); the client's may only call. Keys are EC P-256. This is a
development CA: for production, issue certificates from your own PKI with
the same names and uses.

Needs the `cryptography` package (`pip install 'gradpool[certs]'`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import Iterable

from gradpool.worker.engine.errors import GradpoolError

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1", "coordinator", "worker")
ROLES = ("coordinator", "worker", "client")


def _crypto():  # type: ignore[no-untyped-def]
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID as ExtendedKeyUsageOid, NameOID
    except ModuleNotFoundError:
        raise GradpoolError("`gradpool certs` needs the cryptography package: pip install 'gradpool[certs]'") from None
    return x509, hashes, serialization, ec, ExtendedKeyUsageOid, NameOID


def _san(hosts: Iterable[str]):  # type: ignore[no-untyped-def]
    x509 = _crypto()[0]
    names = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_dev_certs(directory: "str | os.PathLike[str]", hosts: Iterable[str] = (), days: int = 365,
                   key_mode: int = 0o600) -> dict[str, Path]:
    """Write a CA and coordinator, worker and client certificates into `directory`;
    returns name -> path (ca, ca-key, coordinator, coordinator-key, ...)."""
    x509, hashes, serialization, ec, EKU, NameOID = _crypto()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    written: dict[str, Path] = {}

    def save(name: str, data: bytes, mode: int) -> None:
        path = out / f"{name}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        written[name] = path

    def key_pem(key) -> bytes:  # type: ignore[no-untyped-def]
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gradpool development CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    save("ca", ca.public_bytes(serialization.Encoding.PEM), 0o644)
    save("ca-key", key_pem(ca_key), 0o600)
    server_hosts = [*DEFAULT_HOSTS, *hosts]
    for role in ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        uses = [EKU.CLIENT_AUTH] if role == "client" else [EKU.SERVER_AUTH, EKU.CLIENT_AUTH]
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"gradpool {role}"),
                                            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
                   .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(uses), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if role != "client":
            builder = builder.add_extension(_san(server_hosts), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        save(role, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        save(f"{role}-key", key_pem(key), key_mode)
    return written
