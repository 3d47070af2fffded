"""`python -m ferry.services.gateway` as a real process: flags, JSON logs, SDK and HTTP, and a
clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import uvloop

from ferry import AsyncClient, Unauthorized
from ferry.common.text import TextModel
from tests.e2e.test_gateway_harness import FakeCluster, free_ports, gateway_config, wait_until
from tests.unit.test_gateway_text import make_model_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_gateway_process(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    (http_port,) = free_ports(1)
    config = gateway_config(model_dir, api_keys=("key1",))
    sdk_port = config.sdk.bind.rsplit(":", 1)[1]
    inbox_port = config.inbox.bind.rsplit(":", 1)[1]
    cmd = [
        sys.executable, "-m", "ferry.services.gateway", "--model", str(model_dir),
        "--model-name", "tiny", "--gateway-id", "gwp", "--http-host", "127.0.0.1",
        "--http-port", str(http_port), "--sdk-port", sdk_port, "--inbox-port", inbox_port,
        "--scheduler-addr", config.scheduler_addr, "--api-keys", "key1",
        "--max-inflight", "64", "--bypass-after-s", "5",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "FERRY_LOG_LEVEL": "info",
           "FERRY_LOG_FORMAT": "json"}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    base_url = f"http://127.0.0.1:{http_port}"

    async def body():
        cluster = FakeCluster(config, TextModel.load(model_dir))
        cluster.start()
        try:
            async with aiohttp.ClientSession() as session:
                async def healthy():
                    try:
                        async with session.get(base_url + "/health") as resp:
                            return resp.status == 200
                    except aiohttp.ClientConnectionError:
                        return False

                for _ in range(300):
                    if proc.poll() is not None or await healthy():
                        break
                    await asyncio.sleep(0.05)
                assert proc.poll() is None and await healthy()
                async with AsyncClient(config.sdk.advertise, api_key="key1") as client:
                    out = await client.generate("hello", max_tokens=5)
                    assert out.req_id.startswith("gwp-") and len(out.token_ids) == 5
                async with AsyncClient(config.sdk.advertise, api_key="bad") as client:
                    with pytest.raises(Unauthorized):
                        await client.generate("hello")
                headers = {"Authorization": "Bearer key1"}
                async with session.post(base_url + "/v1/completions", headers=headers,
                                        json={"prompt": "hi", "max_tokens": 3}) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["usage"]["completion_tokens"] == 3
                await wait_until(lambda: cluster.release_reasons() == ["finished"] * 2)
        finally:
            cluster.close()

    try:
        uvloop.run(asyncio.wait_for(body(), timeout=30))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=10)
        finally:
            proc.kill()
        stderr = proc.stderr.read()
    assert rc == 0, stderr
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    ready = [e for e in events if e["event"] == "gateway_ready"]
    assert ready and ready[0]["service"] == "gateway" and ready[0]["level"] == "info"
