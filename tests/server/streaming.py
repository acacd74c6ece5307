"""Streamed completions through the official `openai` client, for tests that act while streams are open."""

from __future__ import annotations

import asyncio

import openai


async def stream_text(client: openai.AsyncOpenAI, model: str, prompt: str, started: asyncio.Event,
                      max_tokens: int) -> str:
    """A greedy streamed completion's text (`ignore_eos`, so it runs all `max_tokens`); `started` is set at
    its first piece."""
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    parts = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            parts.append(chunk.choices[0].text)
            started.set()
    return "".join(parts)
