"""A throwaway certificate authority for tests, the demo and chaos runs.

Mutual TLS needs a CA and one certificate per identity. `issue` makes both at run
time, in a directory of the caller's choosing, so no private key is ever committed
to the repository. Each identity gets `<dir>/<name>/{cert,key,ca}.pem`, the layout
`Credentials.from_dir` (and every service's `--tls-dir`) reads. Its certificate
names the identity as a DNS subject alternative name (what `twopc.security.auth` checks,
and what a channel to "name@host:port" requires of the server, `twopc.rpc.channel`).
Only identities that serve get the hosts they serve on and server use; client
identities (`operator`, `client` by default) get client-only certificates, so
that holding one is never a way to answer as a server.

Needs the `cryptography` package (`pip install twopc[tls]`); production deployments
use their own CA and never this module.

    python -m twopc.security.pki DIR wallet orders shop operator [--host 10.0.0.1 ...]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

DEFAULT_HOSTS = ("127.0.0.1", "::1")
CLIENTS = ("operator", "client")
"""Identities that only call: their certificates are for client use alone."""


def issue(
    directory: str | os.PathLike[str],
    identities: Iterable[str],
    *,
    hosts: Iterable[str] = DEFAULT_HOSTS,
    ca_name: str = "twopc throwaway CA",
    days: int = 2,
    clients: Iterable[str] = CLIENTS,
) -> Path:
    """Creates a fresh CA and a certificate per identity under `directory`.

    Args:
        directory: created if missing; gets ca.pem and one folder per identity.
        identities: names such as "wallet", "shop", "operator" (DNS-name syntax).
        hosts: IP addresses or DNS names every certificate is also valid for.
        ca_name: the CA's common name (a second CA with another name is "wrong").
        days: validity.
        clients: identities that only call: no hosts, client use only. Every
            other identity serves: its hosts, server and client use.

    Returns:
        `directory` as a Path.
    """
    from cryptography import x509  # the optional `tls` extra, needed only here
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    (root / "ca.pem").write_bytes(ca_pem)
    alt: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    only_calls = frozenset(clients)
    for name in identities:
        serves = name not in only_calls
        uses = (
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            if serves
            else [ExtendedKeyUsageOID.CLIENT_AUTH]
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name), *(alt if serves else [])]), critical=False)
            .add_extension(x509.ExtendedKeyUsage(uses), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        folder = root / name
        folder.mkdir(exist_ok=True)
        (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / "ca.pem").write_bytes(ca_pem)
        key_path = folder / "key.pem"
        key_path.touch(mode=0o600)
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return root


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m twopc.security.pki", description=__doc__.split("\n\n")[0])
    p.add_argument("directory", type=Path, help="where to write ca.pem and one folder per identity")
    p.add_argument("identities", nargs="+", help="identity names, e.g. wallet orders shop operator")
    p.add_argument(
        "--host",
        action="append",
        default=None,
        help="an IP or DNS name every certificate is valid for (repeatable; default 127.0.0.1 and ::1)",
    )
    p.add_argument(
        "--clients",
        default=",".join(CLIENTS),
        help="comma-separated identities that only call: client-only certificates, no hosts (default %(default)s)",
    )
    args = p.parse_args()
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    root = issue(args.directory, args.identities, hosts=args.host or DEFAULT_HOSTS, clients=clients)
    print(f"CA and certificates for {', '.join(args.identities)} in {root}/ (use --tls-dir {root}/NAME)")


if __name__ == "__main__":
    main()
