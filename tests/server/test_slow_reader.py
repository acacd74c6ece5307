"""A client that stops reading its stream: the app, under uvicorn (whose flow control pauses the app's writes
once the socket is full), must hold the tokens it could not send as one merged delta per request, not queue
an output per step, and the client must later read every token, in order."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx2 as httpx

from tests.server.app_server import API_KEY, running_app

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def read_sse(sock: socket.socket, timeout_s: float) -> list[dict]:
    """Reads a chunked SSE response to its end; returns the JSON events before [DONE]."""
    sock.settimeout(timeout_s)
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        piece = sock.recv(1 << 16)
        if not piece:
            break
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    body, pos = b"", 0
    while True:  # de-chunk
        end = rest.index(b"\r\n", pos)
        size = int(rest[pos:end], 16)
        if size == 0:
            break
        body += rest[end + 2:end + 2 + size]
        pos = end + 2 + size + 2
    events = [line[len("data: "):] for line in body.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def test_a_reader_that_stalls_gets_its_tokens_merged_not_queued(tiny_model_dir):
    tokens = 2000  # the tiny model holds 2048 positions
    body = {"model": Path(tiny_model_dir).name, "prompt": "stall", "max_tokens": tokens, "ignore_eos": True,
            "temperature": 0, "logprobs": 20, "stream": True, "n": 4}  # ~12 MB of events: more than socket buffers hold
    with running_app(tiny_model_dir) as (url, engine):
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        sock.connect((host, int(port)))
        data = json.dumps(body).encode()
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        try:
            deadline = time.monotonic() + 240
            while engine.stats.finished_requests < 4:  # the engine runs to the end while nobody reads
                assert time.monotonic() < deadline, "the engine stalled with its reader"
                time.sleep(0.2)
            events = read_sse(sock, timeout_s=120)
        finally:
            sock.close()
        pieces = [e["choices"][0] for e in events]
        assert len(pieces) < 4 * tokens / 2, len(pieces)  # what piled up came merged, not one chunk per token
        # every token of every choice arrived, in order: the text is what the request gives read as it comes
        r = httpx.post(url + "/v1/completions", json={**body, "stream": False}, headers=AUTH, timeout=240)
        for choice in r.json()["choices"]:
            mine = [p for p in pieces if p["index"] == choice["index"]]
            assert [t for p in mine for t in p["logprobs"]["tokens"]] == choice["logprobs"]["tokens"]
            assert "".join(p["text"] for p in mine) == choice["text"] and mine[-1]["finish_reason"] == "length"
            assert len(choice["logprobs"]["tokens"]) == tokens
