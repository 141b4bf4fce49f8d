"""Installing and configuring a relay: TLS for agents, config files, env variables."""

from __future__ import annotations

import datetime as dt
import ipaddress
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.acceptance import harness
from tests.acceptance.test_delivery import post


def make_tls(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """A private CA and a server certificate for 127.0.0.1; returns (ca, cert, key) files."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stowhook test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


async def test_an_agent_verifies_the_servers_tls_certificate(relay, agents) -> None:
    ca, cert, key = make_tls(relay.home)
    relay.start("--grpc-tls-cert", str(cert), "--grpc-tls-key", str(key))
    await relay.wait_ready()
    async with harness.Target() as target:
        untrusting = agents(target.url, tls=True, name="untrusting")  # system roots only
        trusting = agents(target.url, "--ca-file", str(ca), tls=True, name="trusting")
        assert (await post(relay.input_url(), b"over TLS"))[0] == 200
        await target.wait_for(1)
        assert target.received[0].body == b"over TLS"
        assert untrusting.proc.poll() is None, "a TLS failure is retried, not fatal"
        assert '"event": "connected"' in trusting.log_text()
        assert '"event": "connected"' not in untrusting.log_text()


async def test_settings_come_from_file_then_environment_then_flags(relay) -> None:
    config = relay.home / "relay.toml"
    config.write_text(
        f'database_url = "sqlite:///{relay.db_path}"\n'
        f'key_file = "{relay.home / "var" / "stowhook.key"}"\n'
        "[serve]\n"
        f'http_listen = "127.0.0.1:{relay.http_port}"\n'
        f'grpc_listen = "127.0.0.1:{relay.grpc_port}"\n'
        "max_body_bytes = 100\n"
    )
    env = {"STOWHOOK_CONFIG": str(config), "STOWHOOK_MAX_BODY_BYTES": "200"}
    relay.start_plain(env)
    await relay.wait_ready()
    assert (await post(relay.input_url(), b"x" * 150))[0] == 200, "environment beats the file"
    assert (await post(relay.input_url(), b"x" * 250))[0] == 413


async def test_an_unknown_setting_in_the_file_is_named(relay) -> None:
    config = relay.home / "relay.toml"
    config.write_text('database_url = "sqlite:///x.db"\ndatabse_url = "typo"\n')
    result = await relay.cli("--config", str(config), "bucket", "list", check=False)
    assert result.returncode != 0
    assert "unknown setting(s) databse_url" in result.stderr


async def test_the_example_config_in_deploy_is_accepted(relay) -> None:
    example = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "relay.toml"
    result = await relay.cli("--config", str(example), "serve", "--help", check=False)
    assert result.returncode == 0, result.stderr
    typo = relay.home / "typo.toml"
    typo.write_text('[serve]\nhttp_lisen = "127.0.0.1:1"\n')
    result = await relay.cli("--config", str(typo), "serve", "--help", check=False)
    assert result.returncode != 0
    assert "unknown setting(s) serve.http_lisen" in result.stderr
