"""What an operator sees of a running agent: /healthz, /metrics and its log lines."""

from __future__ import annotations

import asyncio
import json

from aiohttp import ClientSession, web

from tests.acceptance import harness
from tests.acceptance.test_delivery import post


async def get(url: str) -> tuple[int, str]:
    async with ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def test_health_metrics_and_logs_of_a_running_agent(running, agents) -> None:
    port = harness.free_port()
    base = f"http://127.0.0.1:{port}"
    async with harness.Target(lambda n, _: web.Response(status=500 if n == 1 else 200)) as target:
        agent = agents(target.url, "--metrics-listen", f"127.0.0.1:{port}")
        for _ in range(100):
            try:
                if (await get(f"{base}/healthz"))[0] == 200:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.1)
        assert (await get(f"{base}/healthz"))[0] == 200
        await post(running.input_url(), b'{"secret-body": "do-not-log"}')
        await post(running.input_url(), b"second")
        await target.wait_for(3)
        await asyncio.sleep(0.5)
        status, text = await get(f"{base}/metrics")
        assert status == 200
        assert 'stowhook_agent_delivered_total{bucket="quickstart"} 2.0' in text
        assert 'stowhook_agent_failed_total{bucket="quickstart",outcome="nack"} 1.0' in text
        assert "stowhook_agent_connected 1.0" in text
        assert "stowhook_agent_in_flight 0.0" in text

        running.kill()
        await asyncio.sleep(1.0)
        status, text = await get(f"{base}/healthz")
        assert status == 503 and json.loads(text)["status"] == "disconnected"

    log = agent.log_text()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    names = {entry["event"] for entry in events}
    assert {"connected", "delivery_received", "delivery_acked", "delivery_nacked"} <= names
    assert "disconnected" in names
    acked = [e for e in events if e["event"] == "delivery_acked"]
    assert all(e.get("event_id") for e in acked), "every ack names its event"
    assert "do-not-log" not in log and running.token.split(".")[1] not in log
