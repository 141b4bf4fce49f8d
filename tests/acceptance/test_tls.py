"""TLS end to end: webhooks over HTTPS, agents over gRPC with mTLS, and agent tokens bound
to one client certificate. Every certificate comes from a throw-away CA (tests/tls.py)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import ssl

import aiohttp
import pytest

from tests import tls
from tests.acceptance import harness


async def start_mtls(relay: harness.Relay, pki: tls.Authority) -> None:
    """Serve gRPC over TLS, requiring client certificates that `pki` signed."""
    server = pki.server()
    relay.start(
        "--grpc-tls-cert",
        str(server.cert),
        "--grpc-tls-key",
        str(server.key),
        "--grpc-tls-client-ca",
        str(pki.ca_file),
    )
    await relay.wait_ready()


def tls_agent(  # type: ignore[no-untyped-def]
    agents, target: harness.Target, pki: tls.Authority, client: tls.Issued | None, name: str
):
    """A relay-agent that trusts `pki` for the server and presents `client` (if any)."""
    client_args = [] if client is None else ["--client-cert", str(client.cert)]
    client_args += [] if client is None else ["--client-key", str(client.key)]
    return agents(target.url, "--ca-file", str(pki.ca_file), *client_args, tls=True, name=name)


async def post(url: str, body: bytes, context: ssl.SSLContext | bool = True) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body, ssl=context) as response:
            return response.status


async def test_mtls_lets_in_only_agents_with_a_certificate_from_the_client_ca(
    relay, agents
) -> None:
    pki = tls.Authority.create(relay.home, "relay")
    foreign = tls.Authority.create(relay.home, "foreign")
    await start_mtls(relay, pki)
    async with harness.Target() as target:
        stranger = tls_agent(agents, target, pki, foreign.issue("stranger"), name="stranger")
        anonymous = tls_agent(agents, target, pki, None, name="anonymous")
        assert await post(relay.input_url(), b"for members only") == 200
        for refused in (stranger, anonymous):
            failed = await harness.wait_logged(
                refused.log_text, harness.logged("disconnected"), 20, f"{refused.log} to fail"
            )
            assert "UNAVAILABLE" in failed["error"], failed
        member = tls_agent(agents, target, pki, pki.issue("member"), name="member")
        await target.wait_for(1)
        assert [r.body for r in target.received] == [b"for members only"]
        assert '"event": "connected"' in member.log_text()
        for refused in (stranger, anonymous):
            assert '"event": "connected"' not in refused.log_text()
            assert refused.proc.poll() is None, "a handshake failure is retried, not fatal"


async def test_a_bound_token_is_refused_with_another_certificate_of_the_same_ca(
    relay, agents
) -> None:
    pki = tls.Authority.create(relay.home, "relay")
    cert_a, cert_b = pki.issue("agent-a"), pki.issue("agent-b")
    key_id, secret = relay.token.split(".")
    bound = await relay.cli("token", "bind", key_id, "--cert", str(cert_a.cert))
    assert f"bound token {key_id} to client certificate sha256:{cert_a.sha256()}" in bound.stdout
    (listed,) = await relay.cli_json("token", "list")
    assert listed["client_cert_sha256"] == cert_a.sha256()
    await start_mtls(relay, pki)
    async with harness.Target() as target:
        wrong = tls_agent(agents, target, pki, cert_b, name="wrong")
        assert await wrong.wait_exit() == 4, wrong.log_text()
        refusal = f"token {key_id} is bound to another client certificate"
        assert refusal in wrong.log_text()
        assert refusal in relay.log_text()
        assert secret not in wrong.log_text() + relay.log_text()

        right = tls_agent(agents, target, pki, cert_a, name="right")
        assert await post(relay.input_url(), b"bound") == 200
        await target.wait_for(1)
        assert target.received[0].body == b"bound"
        right.kill()

        await relay.cli("token", "bind", key_id, "--unbind")
        unbound = tls_agent(agents, target, pki, cert_b, name="unbound")
        assert await post(relay.input_url(), b"any certificate again") == 200
        await target.wait_for(2)
        assert '"event": "connected"' in unbound.log_text()
    with sqlite3.connect(relay.db_path) as db:
        actions = db.execute(
            "SELECT action, detail FROM audit_log WHERE resource = ? AND action IN (?, ?)",
            (f"token:{key_id}", "token.bind", "token.unbind"),
        ).fetchall()
    assert actions == [("token.bind", f"sha256={cert_a.sha256()}"), ("token.unbind", None)]


async def test_webhooks_over_https_at_the_url_input_create_prints(relay, agents) -> None:
    pki = tls.Authority.create(relay.home, "relay")
    server = pki.server()
    config = relay.write_config(http_tls_cert=str(server.cert), http_tls_key=str(server.key))
    env = {**os.environ, "STOWHOOK_CONFIG": str(config)}
    created = await asyncio.create_subprocess_exec(
        str(harness.BIN / "relay-server"),
        *("input", "create", "--bucket", "quickstart", "--json"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    url = json.loads((await created.communicate())[0])["url"]
    assert url.startswith(f"https://127.0.0.1:{relay.http_port}/in/"), url

    relay.http_ssl = pki.client_context()
    relay.start_plain({"STOWHOOK_CONFIG": str(config)})
    await relay.wait_ready()
    async with harness.Target() as target:
        agents(target.url)
        assert await post(url, b"sealed in transit", relay.http_ssl) == 200
        await target.wait_for(1)
        assert target.received[0].body == b"sealed in transit"

        with pytest.raises(aiohttp.ClientError):
            await post(url.replace("https://", "http://"), b"plain text to a TLS port")
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await post(url, b"a client that does not trust the CA")  # system roots only
    assert len(await relay.cli_json("event", "list")) == 1, "nothing stored from plain HTTP"
