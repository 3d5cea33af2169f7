"""The federation's key material, with nothing but ``cryptography`` (no ``openssl``).

* a private certificate authority (CA), the only root the SuperNodes and the ``flwr`` CLI
  trust: a SuperNode without ``ca.pem`` cannot reach the SuperLink, and a man in the middle
  cannot present a certificate for the SuperLink's name;
* the SuperLink's TLS certificate, signed by that CA, with SANs for the public host name
  (DNS or IP) plus ``localhost``/``127.0.0.1``/``::1`` -- Flower 1.41 serves the Fleet,
  Control and Runtime APIs on one port with one certificate, and the SuperLink's own
  ServerApp process connects back over ``127.0.0.1``;
* per client, a SuperNode authentication key pair in the format Flower 1.41 reads: an
  ECDSA P-384 private key in OpenSSH format (``flower-supernode
  --auth-supernode-private-key``) and its OpenSSH public key (``flwr supernode register``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.config import ConfigError

__all__ = [
    "CA_DAYS",
    "LEAF_DAYS",
    "fingerprint",
    "make_ca",
    "make_server_cert",
    "normalise_host",
    "pem",
    "pem_private",
    "sans_for",
    "supernode_auth_keys",
]

CA_DAYS = 3650
LEAF_DAYS = 825  # the usual cap on server certificate lifetimes; re-provision to rotate
_CURVE = ec.SECP384R1  # what Flower generates itself for node auth; fine for TLS too
_LOCAL_NAMES = ("localhost",)
_LOCAL_IPS = ("127.0.0.1", "::1")


def make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(_CURVE())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedvault"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        # path_length=0: this CA signs server certificates only, never another CA.
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
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, host: str, sans: list[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(_CURVE())
    now = dt.datetime.now(dt.UTC)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedvault"),
                    x509.NameAttribute(NameOID.COMMON_NAME, host[:64]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.SubjectAlternativeName([_general_name(s) for s in sans]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def supernode_auth_keys(comment: str) -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair: (OpenSSH private key, OpenSSH public key line).

    Flower 1.41 loads the private key with load_ssh_private_key and accepts only EC keys;
    `flwr supernode register` reads an OpenSSH public key on a NIST curve. P-384 is what
    Flower's own key generation uses.
    """
    auth_key = ec.generate_private_key(_CURVE())
    private_ssh = auth_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),  # the SuperNode reads it unattended, with no password
    )
    public_ssh = (
        auth_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" {comment}\n".encode()
    )
    return private_ssh, public_ssh


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def normalise_host(host: str) -> str:
    """A bare host name or IP (no port, no brackets, no scheme); IPs in canonical form."""
    h = host.strip()
    if not h or "://" in h or "/" in h or " " in h:
        raise ConfigError(f"{host!r} is not a host name or IP address (no scheme, no path)")
    h = h.removeprefix("[").removesuffix("]")
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        pass
    if ":" in h:
        raise ConfigError(f"{host!r}: give the host without a port (pass the port separately)")
    return h.lower().rstrip(".")


def sans_for(host: str, extra_hosts: tuple[str, ...] = ()) -> list[str]:
    """The SuperLink certificate's SANs: ``host``, ``extra_hosts``, then the loopback names."""
    names = [host, *(normalise_host(h) for h in extra_hosts), *_LOCAL_NAMES, *_LOCAL_IPS]
    return list(dict.fromkeys(names))


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted PKCS8: flower-superlink hands the key file to uvicorn, which has no
    # password prompt; the 0600 mode is the protection (as for the SuperNode key).
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def fingerprint(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex()
