"""``fedmeta certs``: the TLS certificates and hospital keys of a real deployment, made offline.

At the server, ``fedmeta certs --out certs --server-host HOST ...`` writes::

    ca.crt                    the CA every hospital trusts (copy it to each hospital)
    server.pem, server.key    the SuperLink's certificate (SAN: --server-host names, localhost, 127.0.0.1)
    hospitals/                where the operator puts each hospital's NAME.key.pub

At each hospital, ``fedmeta certs --hospital-key NAME --out keys`` writes ``keys/NAME.key`` (its private
key: OpenSSH, NIST P-384, as Flower's node auth needs; it never leaves the site) and ``keys/NAME.key.pub``,
the only file the hospital sends to the operator, who copies it to ``certs/hospitals/``; ``fedmeta server``
registers it. For a trial on one machine, ``--hospitals NAME ...`` makes the key pairs in
``certs/hospitals/`` instead.

The CA's private key is used once and never written: nobody can mint another certificate for this
deployment, and a new server host name means a new folder. Existing files are never overwritten:
run again with the same ``--out`` to add hospitals. Private keys are written with mode 0600.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import UserError

CA_CERT = "ca.crt"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
HOSPITALS = "hospitals"
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CA_DAYS = 3650
SERVER_DAYS = 825
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
HOSPITAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def hospital_key(certs_dir: Path, name: str) -> Path:
    return certs_dir / HOSPITALS / f"{name}.key"


def hospital_public_keys(certs_dir: Path) -> dict[str, Path]:
    """Hospital name -> public key file, for every ``hospitals/NAME.key.pub`` in the folder."""
    folder = certs_dir / HOSPITALS
    return {p.name.removesuffix(".key.pub"): p for p in sorted(folder.glob("*.key.pub"))} if folder.is_dir() else {}


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _write_new(path: Path, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _write_ca_and_server(out: Path, hosts: list[str]) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = _new_key(), _new_key()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedmeta CA"))
        .issuer_name(_name("fedmeta CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    _write_new(out / CA_CERT, ca_cert.public_bytes(pem))
    _write_new(out / SERVER_CERT, server_cert.public_bytes(pem))
    key_format = serialization.PrivateFormat.PKCS8
    _write_new(out / SERVER_KEY, server_key.private_bytes(pem, key_format, serialization.NoEncryption()), True)


def _check_name(name: str) -> None:
    if not HOSPITAL_NAME.fullmatch(name):
        raise UserError(f"hospital name {name!r}: use letters, digits, '.', '_' and '-' (no spaces or slashes)")


def _write_key_pair(path: Path, name: str) -> None:
    key = _new_key()
    ssh = serialization.Encoding.OpenSSH
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(ssh, serialization.PublicFormat.OpenSSH) + f" {name}\n".encode()
    _write_new(path, private, private=True)
    _write_new(path.with_name(path.name + ".pub"), public)


def make_hospital_key(out: Path, name: str) -> list[str]:
    """At a hospital: its own key pair ``out/NAME.key`` and ``out/NAME.key.pub``; an existing one is kept."""
    _check_name(name)
    out.mkdir(parents=True, exist_ok=True)
    key = out / f"{name}.key"
    if key.exists():
        return [f"kept {key}; send {key}.pub to the server's operator"]
    _write_key_pair(key, name)
    return [f"wrote {key} (keep it here) and {key}.pub: send only {key.name}.pub to the server's operator"]


def make_certs(out: Path, hospitals: list[str], server_hosts: list[str]) -> list[str]:
    """Create what is missing in ``out``; return one line per thing made or kept."""
    for name in hospitals:
        _check_name(name)
    (out / HOSPITALS).mkdir(parents=True, exist_ok=True)
    done = []
    if (out / CA_CERT).exists():
        if server_hosts:
            raise UserError(
                f"{out / CA_CERT} exists, so the server certificate is kept: use a new --out to change --server-host"
            )
        done.append(f"kept {out / CA_CERT} and {out / SERVER_CERT}")
    else:
        hosts = [*server_hosts, *DEFAULT_HOSTS]
        _write_ca_and_server(out, hosts)
        done.append(f"wrote {out / CA_CERT} and {out / SERVER_CERT} for {', '.join(dict.fromkeys(hosts))}")
    for name in hospitals:
        key = hospital_key(out, name)
        if key.exists():
            done.append(f"kept {key}")
        else:
            _write_key_pair(key, name)
            done.append(f"wrote {key} and {key.name}.pub")
    return done


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "certs", help="make the CA and server certificate (at the server), or a hospital's key pair (at the hospital)"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write to")
    parser.add_argument(
        "--hospital-key", metavar="NAME", help="at a hospital: make only its key pair NAME.key, NAME.key.pub"
    )
    parser.add_argument(
        "--hospitals", nargs="+", default=[], metavar="NAME", help="trials: also make these hospitals' key pairs"
    )
    parser.add_argument(
        "--server-host",
        nargs="+",
        default=[],
        metavar="HOST",
        help="names or IPs hospitals use to reach the server (localhost and 127.0.0.1 are always added)",
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    if args.hospital_key is not None:
        if args.hospitals or args.server_host:
            raise UserError("--hospital-key makes only a hospital's key pair: leave out --hospitals and --server-host")
        lines = make_hospital_key(args.out, args.hospital_key)
    else:
        lines = make_certs(args.out, args.hospitals, args.server_host)
    for line in lines:
        print(line)
    return 0
