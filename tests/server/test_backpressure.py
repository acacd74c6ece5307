"""Backpressure: with the waiting queue full, requests get 429 with Retry-After, and nothing accepted is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx2 as httpx

from tests.server.app_server import API_KEY, running_app


def test_full_queue_answers_429_with_retry_after_and_finishes_the_rest(tiny_model_dir):
    model = Path(tiny_model_dir).name
    with running_app(tiny_model_dir, max_waiting=2, retry_after_s=3, engine_kwargs={"max_num_seqs": 1}) as (url, _):
        async def one(client: httpx.AsyncClient, i: int):
            body = {"model": model, "prompt": f"request {i}", "max_tokens": 24, "temperature": 0,
                    "ignore_eos": True}
            return await client.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})

        async def burst():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(one(client, i) for i in range(12)))

        responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    refused = [r for r in responses if r.status_code == 429]
    accepted = [r for r in responses if r.status_code == 200]
    assert refused and accepted, codes
    for r in refused:
        assert r.headers["retry-after"] == "3"
        error = r.json()["error"]
        assert error["type"] == "rate_limit_error" and "retry" in error["message"]
    for r in accepted:  # everything accepted ran to the end
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 24
