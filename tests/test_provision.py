"""Provisioning a deployed federation: the certificate chain, the keys in the formats Flower
1.41 reads, file modes, no silent overwrites, and the generated commands. Fast (no Flower
processes; a TLS handshake over a local socket)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from common.config import ConfigError
from common.crypto import load_identity, load_public
from common.crypto.errors import KeyExistsError
from common.data import encrypted
from common.federation_keys import client_publics, load_own, server_dir
from common.ops import deploy
from common.ops.provision import (
    flwr_config_toml,
    load_federation,
    provision_federation,
    superlink_command,
    supernode_command,
    supernode_node_config,
)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    out = tmp_path_factory.mktemp("prov") / "federation"
    return provision_federation(out, "fl.example.org", 2, port=9443, extra_hosts=("10.0.0.7",))


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verify(fed, name: x509.GeneralName) -> None:
    ca, leaf = _cert(fed.ca_cert), _cert(fed.superlink.cert)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(name)
    verifier.verify(leaf, [])


# -- the chain -----------------------------------------------------------------------------


def test_superlink_cert_is_signed_by_the_ca(fed):
    ca, leaf = _cert(fed.ca_cert), _cert(fed.superlink.cert)
    leaf.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    # Every bundle carries the same CA.
    for path in [fed.superlink.ca_cert, *(c.ca_cert for c in fed.clients)]:
        assert path.read_bytes() == fed.ca_cert.read_bytes()


@pytest.mark.parametrize(
    "name",
    [
        x509.DNSName("fl.example.org"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.IPAddress(ipaddress.ip_address("10.0.0.7")),
    ],
)
def test_chain_validates_for_every_san(fed, name):
    _verify(fed, name)  # full RFC 5280 path validation with name matching


def test_chain_rejects_other_names_and_other_cas(fed, tmp_path):
    with pytest.raises(VerificationError):
        _verify(fed, x509.DNSName("evil.example.org"))
    other = provision_federation(tmp_path / "other", "fl.example.org", 1)
    leaf = _cert(other.superlink.cert)
    verifier = (
        PolicyBuilder()
        .store(Store([_cert(fed.ca_cert)]))
        .build_server_verifier(x509.DNSName("fl.example.org"))
    )
    with pytest.raises(VerificationError):
        verifier.verify(leaf, [])


def test_sans_present(fed):
    san = _cert(fed.superlink.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert set(san.value.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert {str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1",
        "::1",
        "10.0.0.7",
    }


def test_ip_host_goes_into_an_ip_san(tmp_path):
    fed = provision_federation(tmp_path / "f", "[2001:db8::1]", 1)
    assert fed.superlink_host == "2001:db8::1"
    assert fed.superlink_address == "[2001:db8::1]:8000"
    san = _cert(fed.superlink.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert ipaddress.ip_address("2001:db8::1") in san.value.get_values_for_type(x509.IPAddress)
    assert "2001:db8::1" not in san.value.get_values_for_type(x509.DNSName)


@pytest.mark.parametrize("host", ["https://fl.example.org", "fl.example.org:9092", "", "a b"])
def test_bad_hosts_are_refused(tmp_path, host):
    with pytest.raises(ValueError):
        provision_federation(tmp_path / "f", host, 1)
    assert not (tmp_path / "f").exists()


def test_tls_handshake_with_the_ca_only(fed, tmp_path):
    """A real TLS server with the SuperLink's key: a client trusting our CA connects (by
    name and by IP); a client with the system roots only is refused."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(fed.superlink.cert, fed.superlink.key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(3):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        trusting = ssl.create_default_context(cafile=str(fed.ca_cert))
        for hostname in ("localhost", "127.0.0.1"):
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                trusting.wrap_socket(raw, server_hostname=hostname) as tls,
            ):
                assert tls.recv(2) == b"ok"
        system_only = ssl.create_default_context()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            system_only.wrap_socket(raw, server_hostname="localhost")
    finally:
        listener.close()
        thread.join(5)


# -- keys in Flower's formats ----------------------------------------------------------------


def test_supernode_auth_keys_are_what_flower_reads(fed):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    for c in fed.clients:
        args = argparse.Namespace(
            auth_supernode_private_key=str(c.auth_private_key), auth_supernode_public_key=None
        )
        private, public = _try_setup_client_authentication(args)  # flower-supernode's parser
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        # `flwr supernode register` reads the .pub; both sides must name the same key.
        assert try_load_public_key(c.auth_public_key) == public_key_to_bytes(public)
        sl_copy = fed.superlink.supernode_public_keys[c.partition_id]
        assert sl_copy.read_bytes() == c.auth_public_key.read_bytes()
    keys = {c.auth_public_key.read_text() for c in fed.clients}
    assert len(keys) == len(fed.clients)  # one key per node


def test_server_private_key_matches_its_certificate(fed):
    key = serialization.load_pem_private_key(fed.superlink.key.read_bytes(), None)
    leaf = _cert(fed.superlink.cert)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()


def test_fedvault_identities_in_the_keys_dir_layout(fed):
    keys = fed.superlink.keys_dir
    server = load_own(server_dir(keys))
    assert server.role == "server" and server.data_key is None
    publics = client_publics(keys)
    assert sorted(publics) == [0, 1]
    for c in fed.clients:
        identity = load_identity(c.identity_dir)
        assert identity.role == "client" and identity.data_key is not None
        assert publics[c.partition_id].ids == identity.public.ids
        assert load_public(c.server_public).ids == server.public.ids
    # The SuperLink side holds no client private key.
    assert not list(keys.glob("client-*/*.pem")) and not list(keys.glob("client-*/data_key*"))


def test_private_keys_are_0600_and_public_files_are_not(fed):
    private = [fed.ca_key, fed.superlink.key, *(c.auth_private_key for c in fed.clients)]
    private += list(fed.directory.rglob("*_private.pem")) + list(fed.directory.rglob("data_key*"))
    # CA, TLS, 2 SuperNode auth keys; X25519+Ed25519 PEMs of 3 identities; 2 client data keys
    assert len(private) == 1 + 1 + 2 + 3 * 2 + 2
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in [fed.ca_cert, fed.superlink.cert, *(c.auth_public_key for c in fed.clients)]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    for script in [fed.superlink.start_script, *(c.start_script for c in fed.clients)]:
        assert os.access(script, os.X_OK)


# -- no overwrite ----------------------------------------------------------------------------


def test_no_overwrite_without_force(tmp_path):
    out = tmp_path / "f"
    first = provision_federation(out, "127.0.0.1", 2)
    ca_before = first.ca_cert.read_bytes()
    auth_before = first.clients[0].auth_private_key.read_bytes()
    with pytest.raises(KeyExistsError, match="already holds a federation"):
        provision_federation(out, "127.0.0.1", 2)
    assert first.ca_cert.read_bytes() == ca_before
    assert first.clients[0].auth_private_key.read_bytes() == auth_before

    second = provision_federation(out, "127.0.0.1", 1, force=True)
    assert second.ca_cert.read_bytes() != ca_before
    assert second.clients[0].auth_private_key.read_bytes() != auth_before
    assert not (out / "client-1").exists()  # the old, larger federation is gone
    assert load_federation(out).num_clients == 1


def test_force_never_deletes_what_fedvault_did_not_make(tmp_path):
    out = tmp_path / "f"
    (out / "client-0").mkdir(parents=True)
    (out / "client-0" / "precious.txt").write_text("x")
    with pytest.raises(KeyExistsError):
        provision_federation(out, "127.0.0.1", 1, force=True)
    assert (out / "client-0" / "precious.txt").read_text() == "x"
    # Nor a dir the manifest does not list, when a larger federation replaces a smaller one.
    other = tmp_path / "g"
    provision_federation(other, "127.0.0.1", 1)
    (other / "client-1").mkdir()
    (other / "client-1" / "precious.txt").write_text("y")
    with pytest.raises(KeyExistsError, match="client-1"):
        provision_federation(other, "127.0.0.1", 2, force=True)
    assert (other / "client-1" / "precious.txt").read_text() == "y"
    assert (other / "client-0" / "supernode-auth.key").exists()


# -- commands and config ---------------------------------------------------------------------


def test_manifest_round_trip(fed):
    again = load_federation(fed.directory)
    assert again == fed
    doc = json.loads((fed.directory / "federation.json").read_text())
    assert "PRIVATE" not in json.dumps(doc)


def test_node_config_parses_with_flowers_parser(fed, tmp_path):
    from flwr.common.config import parse_config_args

    client = fed.clients[1]
    parsed = parse_config_args([supernode_node_config(client, 2, tmp_path / "s t")])
    assert parsed == {
        "partition-id": 1,
        "num-partitions": 2,
        "key-dir": str(client.identity_dir),
        "server-public": str(client.server_public),
        "state-dir": str(tmp_path / "s t"),
    }


def test_commands_carry_tls_and_auth_flags(fed):
    sl = superlink_command(fed.superlink, port=9443)
    assert sl[0] == "flower-superlink" and "--enable-supernode-auth" in sl
    assert "--insecure" not in sl
    for flag, path in (("--ssl-ca-certfile", fed.superlink.ca_cert),
                       ("--ssl-certfile", fed.superlink.cert),
                       ("--ssl-keyfile", fed.superlink.key)):  # fmt: skip
        assert sl[sl.index(flag) + 1] == str(path)
    sn = supernode_command(fed.clients[0], fed.superlink_address, 2, runtime_port=9999)
    assert sn[sn.index("--superlink") + 1] == "fl.example.org:9443"
    assert sn[sn.index("--root-certificates") + 1] == str(fed.clients[0].ca_cert)
    assert sn[sn.index("--auth-supernode-private-key") + 1] == str(fed.clients[0].auth_private_key)
    assert "--insecure" not in sn and sn[sn.index("--port") + 1] == "9999"


def test_flwr_config_is_a_tls_connection_flower_accepts(fed):
    import tomllib

    from flwr.cli.flower_config import parse_superlink_connection

    doc = tomllib.loads(flwr_config_toml(fed.superlink_address, fed.ca_cert))
    assert doc["superlink"]["default"] == "fedvault"
    conn = parse_superlink_connection(doc["superlink"]["fedvault"], "fedvault")
    assert conn.address == "fl.example.org:9443"
    assert conn.root_certificates == str(fed.ca_cert) and conn.insecure is False


def test_start_script_passes_the_exact_flags(fed, tmp_path):
    """Run the generated start-supernode.sh with stand-ins for `flower-supernode` and
    `fedvault` that print their argv: the quoting survives, the paths point into the (moved)
    bundle, the SuperNode runs in process isolation and the launcher serves its port with
    the bundle's approved-apps.txt."""
    moved = tmp_path / "moved client"
    subprocess.run(["cp", "-r", str(fed.clients[0].directory), str(moved)], check=True)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # The launcher runs in the background and the script execs the SuperNode: ours waits
    # (≤ 10 s) until the launcher stand-in has written its argv.
    wait = f'i=0; while [ ! -s "{tmp_path}/fedvault.argv" ] && [ $i -lt 200 ]; do '
    wait += "sleep 0.05; i=$((i+1)); done\n"
    for name, then in (("flower-supernode", wait), ("fedvault", "")):
        fake = bindir / name
        fake.write_text(
            f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "{tmp_path}/{name}.tmp"\n'
            f'mv "{tmp_path}/{name}.tmp" "{tmp_path}/{name}.argv"\n{then}'
        )
        fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(
        ["sh", str(moved / "start-supernode.sh"), "--port", "9999", "--max-retries", "3"],
        env=env, capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    out = (tmp_path / "flower-supernode.argv").read_text().splitlines()
    launcher = (tmp_path / "fedvault.argv").read_text().splitlines()
    assert launcher[0] == "clientapp" and "--insecure" in launcher
    assert launcher[launcher.index("--runtime-api-address") + 1] == "127.0.0.1:9999"
    assert launcher[launcher.index("--approved-fab-hashes") + 1] == str(moved / "approved-apps.txt")
    assert out[out.index("--isolation") + 1] == "process"
    assert out[out.index("--superlink") + 1] == "fl.example.org:9443"
    assert out[out.index("--root-certificates") + 1] == str(moved / "ca.pem")
    assert out[out.index("--auth-supernode-private-key") + 1] == str(moved / "supernode-auth.key")
    from flwr.common.config import parse_config_args

    node_config = parse_config_args([out[out.index("--node-config") + 1]])
    assert node_config["key-dir"] == str(moved / "identity")
    assert node_config["server-public"] == str(moved / "server-public.json")
    assert node_config["partition-id"] == 0 and node_config["num-partitions"] == 2
    assert out[out.index("--port") + 1] == "9999" and out[-2:] == ["--max-retries", "3"]
    for script in fed.superlink.directory.glob("*.sh"):
        subprocess.run(["sh", "-n", str(script)], check=True)


def test_approved_apps_file_in_every_client_bundle(fed, tmp_path):
    """Empty by default (the holder approves); hashes given at provisioning are written and
    read back by the launcher; anything but a SHA-256 is refused."""
    from common.ops.approved_app import read_approved

    for c in fed.clients:
        assert c.approved_apps == c.directory / "approved-apps.txt"
        assert read_approved(c.approved_apps) == []
        assert "fedvault fab-hash" in c.approved_apps.read_text()
    h = "ab" * 32
    one = provision_federation(tmp_path / "f", "127.0.0.1", 1, approved_apps=(h.upper(),))
    assert read_approved(one.clients[0].approved_apps) == [h]
    assert load_federation(tmp_path / "f").clients[0].approved_apps == one.clients[0].approved_apps
    with pytest.raises(ConfigError, match="not a SHA-256"):
        provision_federation(tmp_path / "g", "127.0.0.1", 1, approved_apps=("abc",))


def test_warns_when_provisioned_inside_an_app_that_would_ship_it(tmp_path, caplog):
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text('[tool.flwr.app]\npublisher = "x"\n')
    with caplog.at_level(logging.WARNING, logger="fedvault.provision"):
        provision_federation(app / "federation", "127.0.0.1", 1)
    assert "would pack its *.json files" in caplog.text
    caplog.clear()
    (app / ".gitignore").write_text("secrets/\n")
    with caplog.at_level(logging.WARNING, logger="fedvault.provision"):
        provision_federation(app / "secrets", "127.0.0.1", 1)
    assert "would pack" not in caplog.text


def test_a_client_encrypts_its_own_partition(fed, tmp_path):
    """The edge-side data step: only this client's key, and the ClientApp's loader reads it."""
    client = fed.clients[1]
    path = deploy.prepare_client_partition(client.identity_dir, 1, 2, tmp_path / "enc")
    assert path.name == "partition-1.fvd"
    part = encrypted.load(tmp_path / "enc", 1, load_identity(client.identity_dir), 4096)
    assert len(part.train) > 400
    from common.crypto.errors import WrongKeyError

    with pytest.raises(WrongKeyError):
        encrypted.load(tmp_path / "enc", 1, load_identity(fed.clients[0].identity_dir), 4096)
