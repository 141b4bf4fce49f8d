"""TLS settings and checks without a network: key permissions, HTTPS settings, bindings."""

from __future__ import annotations

import datetime as dt
import hashlib
import pathlib
import ssl

import pytest

from relay_agent import config as agent_config
from relay_agent import errors as agent_errors
from relay_agent import settings as agent_settings
from relay_server import errors, models, settings, tls
from tests import tls as test_tls


@pytest.fixture
def pki(tmp_path: pathlib.Path) -> test_tls.Authority:
    return test_tls.Authority.create(tmp_path)


def token(bound_to: str | None) -> models.Token:
    now = dt.datetime.now(dt.UTC)
    return models.Token(
        key_id="shk_0123456789abcdef",
        account_id="a",
        name="agent",
        bucket_ids=(),
        created_at=now,
        revoked_at=None,
        last_used_at=None,
        client_cert_sha256=bound_to,
    )


def test_https_needs_both_files_and_shows_in_the_public_url(tmp_path: pathlib.Path) -> None:
    with pytest.raises(errors.ConfigError, match="both --http-tls-cert and --http-tls-key"):
        settings.IngressSettings(tls_cert=tmp_path / "cert.pem")
    with pytest.raises(errors.ConfigError, match="both --http-tls-cert and --http-tls-key"):
        settings.IngressSettings(tls_key=tmp_path / "key.pem")
    plain = settings.IngressSettings(listen="0.0.0.0:8443")
    assert plain.base_url == "http://127.0.0.1:8443"
    https = settings.IngressSettings(
        listen="0.0.0.0:8443", tls_cert=tmp_path / "c", tls_key=tmp_path / "k"
    )
    assert https.base_url == "https://127.0.0.1:8443"


def test_the_https_context_allows_tls_1_2_and_newer_only(pki: test_tls.Authority) -> None:
    server = pki.server()
    context = tls.https_context(server.cert, server.key)
    assert context is not None
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.verify_mode is ssl.CERT_NONE  # webhook senders present no certificate
    assert tls.https_context(None, None) is None


def test_a_private_key_other_users_can_read_is_refused(pki: test_tls.Authority) -> None:
    server = pki.server()
    server.key.chmod(0o644)
    with pytest.raises(errors.ConfigError, match=r"readable by other users; run: chmod 600"):
        tls.https_context(server.cert, server.key)
    with pytest.raises(errors.ConfigError, match=r"readable by other users"):
        tls.read_private_key(server.key)
    server.key.chmod(0o640)  # root:ssl-cert style group access stays allowed
    assert tls.https_context(server.cert, server.key) is not None


def test_a_key_that_does_not_match_the_certificate_is_named(pki: test_tls.Authority) -> None:
    first, second = pki.issue("first"), pki.issue("second")
    with pytest.raises(errors.ConfigError, match=f"cannot use {first.cert} with {second.key}"):
        tls.https_context(first.cert, second.key)
    with pytest.raises(errors.ConfigError, match="cannot be read"):
        tls.read_private_key(first.key.with_name("missing.key"))


def test_an_unbound_token_takes_any_connection() -> None:
    tls.check_binding(token(None), {})
    tls.check_binding(token(None), {tls.PEER_CERT_KEY: [b"not even parsed"]})


def test_a_bound_token_takes_only_its_own_certificate(pki: test_tls.Authority) -> None:
    mine, other = pki.issue("mine"), pki.issue("other")
    bound = token(mine.sha256())
    tls.check_binding(bound, {tls.PEER_CERT_KEY: [mine.cert.read_bytes()]})
    with pytest.raises(errors.PermissionDenied, match="shk_0123456789abcdef is bound to another"):
        tls.check_binding(bound, {tls.PEER_CERT_KEY: [other.cert.read_bytes()]})
    with pytest.raises(errors.PermissionDenied, match="presented none"):
        tls.check_binding(bound, {})


def test_the_fingerprint_is_the_sha256_of_the_der(pki: test_tls.Authority) -> None:
    issued = pki.issue("agent")
    der = ssl.PEM_cert_to_DER_cert(issued.cert.read_text())
    assert tls.fingerprint(issued.cert.read_bytes()) == hashlib.sha256(der).hexdigest()
    with pytest.raises(errors.ConfigError, match="not a PEM certificate"):
        tls.fingerprint(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"client_cert": pathlib.Path("c.pem")}, "both --client-cert and --client-key"),
        ({"client_key": pathlib.Path("k.pem")}, "both --client-cert and --client-key"),
        (
            {"client_cert": pathlib.Path("c"), "client_key": pathlib.Path("k"), "insecure": True},
            "--client-cert and --insecure contradict",
        ),
    ],
)
def test_the_agent_checks_its_client_certificate_settings(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(agent_errors.ConfigError, match=message):
        agent_settings.AgentSettings(
            server="relay:50051", token="shk_1.secret", buckets=("b",), **options
        )


def test_the_agent_config_file_names_a_client_certificate(tmp_path: pathlib.Path) -> None:
    text = (
        'server = "relay:50051"\ntoken = "shk_1.secret"\nca_file = "ca.pem"\n'
        'client_cert = "agent.pem"\nclient_key = "/etc/stowhook/agent.key"\n'
        '[[subscription]]\nbucket = "b"\nforward = "http://127.0.0.1:9/"\n'
    )
    loaded = agent_config.parse(text, source="agent.toml", base_dir=tmp_path, environ={})
    (only,) = loaded.subscriptions
    assert only.agent.client_cert == tmp_path / "agent.pem"  # relative to the file
    assert only.agent.client_key == pathlib.Path("/etc/stowhook/agent.key")
