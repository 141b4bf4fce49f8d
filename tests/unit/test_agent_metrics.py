from __future__ import annotations

from aiohttp import ClientSession

from relay_agent import metrics, models


async def test_healthz_reports_whether_a_stream_is_open_and_metrics_count_outcomes() -> None:
    observed = metrics.AgentMetrics()
    async with metrics.MetricsServer(observed, "127.0.0.1", 0) as server:
        base = f"http://127.0.0.1:{server.port}"
        async with ClientSession() as session:
            async with session.get(f"{base}/healthz") as resp:
                assert resp.status == 503
                assert (await resp.json())["status"] == "disconnected"
            observed.stream_opened()
            for outcome in (models.Ack(), models.Ack(), models.Nack(reason="HTTP 500")):
                observed.delivery_started()
                observed.delivery_finished("github", outcome)
            observed.delivery_started()  # one still running
            async with session.get(f"{base}/healthz") as resp:
                assert (resp.status, await resp.json()) == (200, {"status": "ok", "streams": 1})
            async with session.get(f"{base}/metrics") as resp:
                text = await resp.text()
    assert 'stowhook_agent_delivered_total{bucket="github"} 2.0' in text
    assert 'stowhook_agent_failed_total{bucket="github",outcome="nack"} 1.0' in text
    assert "stowhook_agent_in_flight 1.0" in text
    assert "stowhook_agent_connected 1.0" in text
    assert "stowhook_agent_last_delivery_timestamp_seconds 1" in text
