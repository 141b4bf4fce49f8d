"""Installing and configuring a relay: TLS for agents, config files, env variables."""

from __future__ import annotations

import pathlib

from tests import tls
from tests.acceptance import harness
from tests.acceptance.test_delivery import post


async def test_an_agent_verifies_the_servers_tls_certificate(relay, agents) -> None:
    pki = tls.Authority.create(relay.home)
    server = pki.server()
    relay.start("--grpc-tls-cert", str(server.cert), "--grpc-tls-key", str(server.key))
    await relay.wait_ready()
    async with harness.Target() as target:
        untrusting = agents(target.url, tls=True, name="untrusting")  # system roots only
        trusting = agents(target.url, "--ca-file", str(pki.ca_file), tls=True, name="trusting")
        assert (await post(relay.input_url(), b"over TLS"))[0] == 200
        await target.wait_for(1)
        assert target.received[0].body == b"over TLS"
        assert untrusting.proc.poll() is None, "a TLS failure is retried, not fatal"
        assert '"event": "connected"' in trusting.log_text()
        assert '"event": "connected"' not in untrusting.log_text()


async def test_settings_come_from_file_then_environment_then_flags(relay) -> None:
    config = relay.write_config(max_body_bytes=100)
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
