"""The /dashboard page, run by headless Chromium against the real app: its heatmap, health table, shard table
and engine figures match /v1/experts and /metrics (the shares drawn are the server's, never recomputed by the
page), its fetches carry the key from the page's URL fragment, the key leaves the address bar once the page
has it and no request carries it in a Referer, a wrong key shows the error banner, and the page draws
something.

Skipped without Chromium (Debian package `chromium`). The page's own HTML, and that it ships as package data,
are checked without it."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import struct
import subprocess
import threading
import tomllib
import zlib
from contextlib import contextmanager
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest

from expertmesh.platform.server.dashboard import DASHBOARD_HTML
from tests.server.app_server import API_KEY, running_app

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed "
                                    "(apt-get install chromium): the dashboard's script needs a browser")
AUTH = {"Authorization": f"Bearer {API_KEY}"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@pytest.fixture(scope="module")
def loaded_app(tiny_model_dir):
    """The app with API keys on, after a few completions so every MoE layer has load; yields (url, client)."""
    with running_app(tiny_model_dir) as (url, _), httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        for i in range(3):
            r = client.post("/v1/completions", json={"model": tiny_model_dir.name, "prompt": f"the load test {i}",
                                                     "max_tokens": 8, "seed": i})
            assert r.status_code == 200, r.text
        yield url, client


def run_chromium(tmp_path, url: str, *args: str) -> str:
    """Loads `url` with 5 s of virtual time for the page's script, then does what `args` ask; returns stdout."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", *args, url]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, f"chromium exited {r.returncode}: {r.stderr[-2000:]}"
    return r.stdout


class Dom(HTMLParser):
    """Chromium's --dump-dom output as a flat list of elements, each knowing its ancestors' ids and its text."""

    def __init__(self, html: str):
        super().__init__()
        self.nodes: list[dict] = []
        self._open: list[dict] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        node = {"tag": tag, "attrs": dict(attrs), "text": [],
                "within": {n["attrs"].get("id") for n in self._open} - {None}}
        self.nodes.append(node)
        if tag not in _VOID:
            self._open.append(node)

    def handle_endtag(self, tag):
        while self._open and self._open.pop()["tag"] != tag:
            pass

    def handle_data(self, data):
        for node in self._open:
            node["text"].append(data)

    def by_id(self, id_: str) -> dict:
        (node,) = [n for n in self.nodes if n["attrs"].get("id") == id_]
        return node

    def inside(self, id_: str, tag: str) -> list[dict]:
        return [n for n in self.nodes if id_ in n["within"] and n["tag"] == tag]


def text(node: dict) -> str:
    return "".join(node["text"]).strip()


def classes(node: dict) -> set[str]:
    return set((node["attrs"].get("class") or "").split())


def metric(body: str, name: str) -> float:
    (value,) = re.findall(rf"^{name} (\S+)$", body, re.MULTILINE)
    return float(value)


def png_rgb(path) -> np.ndarray:
    """[H, W, 3] pixels of an 8-bit, non-interlaced RGB(A) PNG such as Chromium's screenshots (PIL is not a
    dependency, and a PNG decoder is a few lines of zlib and the five row filters)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat.append(chunk)
        pos += 12 + length
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, (depth, colour_type, interlace)
    bpp = 3 if colour_type == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height, width * bpp), np.int32)
    prev = np.zeros(width * bpp, np.int32)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if kind == 1:  # Sub: a running sum along the row, per channel
            line = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) & 255
        elif kind == 2:  # Up
            line = (line + prev) & 255
        elif kind in (3, 4):  # Average, Paeth: each byte needs the one decoded just before it
            cur, up = line.tolist(), prev.tolist()
            for i in range(len(cur)):
                a, b, c = (cur[i - bpp], up[i], up[i - bpp]) if i >= bpp else (0, up[i], 0)
                if kind == 3:
                    cur[i] = (cur[i] + (a + b) // 2) & 255
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            line = np.array(cur, np.int32)
        out[y] = prev = line
    return out.reshape(height, width, bpp)[..., :3].astype(np.uint8)


@contextmanager
def serving(experts: dict, pages: dict[str, str] | None = None, seen: list | None = None):
    """Serves the page, `experts` as /v1/experts, no metrics and `pages` (path: HTML) on 127.0.0.1 with no keys;
    yields the base URL. Each request's (path, headers) is appended to `seen`."""
    routes = {"/dashboard": ("text/html", DASHBOARD_HTML), "/v1/experts": ("application/json", json.dumps(experts)),
              "/metrics": ("text/plain", ""), **{path: ("text/html", html) for path, html in (pages or {}).items()}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if seen is not None:
                seen.append((self.path, dict(self.headers)))
            kind, body = routes.get(self.path.split("?")[0], ("text/plain", ""))
            data = body.encode()
            self.send_response(200 if self.path.split("?")[0] in routes else 404)
            self.send_header("Content-Type", f"{kind}; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # keep the test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(15)
        server.server_close()


def test_page_is_package_data():
    """A non-editable install (the container image) carries only the files pyproject's package-data names."""
    page = resources.files("expertmesh.platform.server").joinpath("dashboard.html")
    assert page.read_text(encoding="utf-8") == DASHBOARD_HTML
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"].get("expertmesh.platform.server", [])
    assert any(fnmatch.fnmatch("dashboard.html", p) for p in patterns), patterns


def test_page_is_self_contained_and_inserts_no_html():
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", DASHBOARD_HTML), "loads something from elsewhere"
    assert "@import" not in DASHBOARD_HTML and "url(" not in DASHBOARD_HTML
    for unsafe in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
        assert unsafe not in DASHBOARD_HTML, f"{unsafe} would parse server data as HTML"


@needs_chromium
def test_dashboard_shows_the_live_load_fetched_with_the_key_from_its_url(loaded_app, tmp_path):
    url, client = loaded_app
    # The data routes take the key only as a header: data on the page proves its fetches sent one.
    assert httpx.get(f"{url}/v1/experts?key={API_KEY}").status_code == 401
    dom = Dom(run_chromium(tmp_path, f"{url}/dashboard#key={API_KEY}", "--dump-dom"))
    experts = client.get("/v1/experts").json()  # no traffic since: the window's counts have not moved
    metrics = client.get("/metrics").text

    status = dom.by_id("status")
    assert classes(status) == {"ok"} and text(status).startswith("updated"), text(status)
    assert "hidden" in dom.by_id("banner")["attrs"], text(dom.by_id("banner"))

    layers, num_experts = experts["placement"]["moe_layers"], experts["num_experts"]
    cells = [n for n in dom.inside("heatmap", "td") if "data-expert" in n["attrs"]]
    assert len(cells) == len(layers) * num_experts
    shown = {(int(c["attrs"]["data-layer"]), int(c["attrs"]["data-expert"])): int(c["attrs"]["data-count"])
             for c in cells}
    window = experts["load"]["window"]
    assert shown == {(layer, e): window[str(layer)][e] for layer in layers for e in range(num_experts)}
    assert all(sum(window[str(layer)]) > 0 for layer in layers)
    replicas = experts["placement"]["replicas"]
    for c in cells:  # the shards holding each expert are written under its count
        layer, e = int(c["attrs"]["data-layer"]), int(c["attrs"]["data-expert"])
        assert text(c) == f"{shown[layer, e]}s" + ",".join(map(str, replicas[f"{layer}:{e}"]))
    shares = experts["shares"]["window"]
    assert {(int(c["attrs"]["data-layer"]), int(c["attrs"]["data-expert"])): float(c["attrs"]["data-share"])
            for c in cells} == {(layer, e): shares[str(layer)][e] for layer in layers for e in range(num_experts)}

    rows = [n for n in dom.inside("health", "tr") if "data-layer" in n["attrs"]]
    assert [int(r["attrs"]["data-layer"]) for r in rows] == layers
    for row, h in zip(rows, experts["health"]):
        assert ("warn" in classes(row)) == (h["busiest_share"] > 0.4 or h["entropy"] < 0.5), h
        assert f"expert {h['busiest_expert']}" in text(row)

    shards = [n for n in dom.inside("shards", "tr") if "data-shard" in n["attrs"]]
    assert [int(s["attrs"]["data-shard"]) for s in shards] == list(range(experts["placement"]["num_shards"]))
    assert_shard_rows(shards, experts["shards"]["window"])
    kv = dom.by_id("m-kv")["attrs"]
    assert float(kv["data-total"]) == metric(metrics, "expertmesh_kv_cache_blocks_total")
    assert float(kv["data-value"]) == metric(metrics, "expertmesh_kv_cache_blocks_used")
    assert float(dom.by_id("m-running")["attrs"]["data-value"]) == 0


def assert_shard_rows(rows: list[dict], expected: list[dict]) -> None:
    """The shard table's rows are the server's `shards` figures, in its order."""
    assert [int(r["attrs"]["data-shard"]) for r in rows] == [s["shard"] for s in expected]
    for row, s in zip(rows, expected):
        assert float(row["attrs"]["data-share"]) == s["share"], (row["attrs"], s)
        # cells: "shard N", experts held, replicated, then the share as a percentage
        assert text(row).startswith(f"shard {s['shard']}{s['experts']}{s['replicated']}"), (text(row), s)


@needs_chromium
def test_page_draws_the_servers_shares_not_its_own(loaded_app, tmp_path):
    """Served shares that the counts do not imply are drawn as served: the page derives none of its own."""
    _, client = loaded_app
    experts = client.get("/v1/experts").json()
    layers, num_experts = experts["placement"]["moe_layers"], experts["num_experts"]
    for scope in ("window", "total"):
        experts["shares"][scope] = {str(layer): [(i * num_experts + e + 1) / 1000 for e in range(num_experts)]
                                    for i, layer in enumerate(layers)}
        experts["shards"][scope] = [{**s, "experts": 100 + s["shard"], "replicated": 50 + s["shard"],
                                     "share": (s["shard"] + 1) / 1000} for s in experts["shards"][scope]]
    counts = experts["load"]["window"]
    recomputed = {str(layer): [c / (sum(counts[str(layer)]) / experts["top_k"]) for c in counts[str(layer)]]
                  for layer in layers}
    assert recomputed != experts["shares"]["window"]  # otherwise this test could not tell the two apart

    with serving(experts) as url:
        dom = Dom(run_chromium(tmp_path, f"{url}/dashboard", "--dump-dom"))
    assert classes(dom.by_id("status")) == {"ok"}, text(dom.by_id("banner"))
    cells = [n for n in dom.inside("heatmap", "td") if "data-expert" in n["attrs"]]
    shares = experts["shares"]["window"]
    assert {(int(c["attrs"]["data-layer"]), int(c["attrs"]["data-expert"])): float(c["attrs"]["data-share"])
            for c in cells} == {(layer, e): shares[str(layer)][e] for layer in layers for e in range(num_experts)}
    assert_shard_rows([n for n in dom.inside("shards", "tr") if "data-shard" in n["attrs"]],
                      experts["shards"]["window"])


# A page of the same origin that opens the dashboard in a frame and, once it has run, writes the frame's
# address and the number of history entries into its own DOM.
_FRAME = """<!doctype html><html><body>
<iframe id="f" src="{src}"></iframe>
<script>
setTimeout(() => {{
  const w = document.getElementById("f").contentWindow;
  document.body.setAttribute("data-href", w.location.href);
  document.body.setAttribute("data-status", w.document.getElementById("status").className);
}}, 3000);
</script></body></html>"""


@needs_chromium
@pytest.mark.parametrize("given", ["#key=", "?key="])
def test_the_key_leaves_the_address_bar_and_never_travels_in_a_referer(loaded_app, tmp_path, given):
    _, client = loaded_app
    experts = client.get("/v1/experts").json()
    seen: list = []
    with serving(experts, {"/frame": _FRAME.format(src=f"/dashboard{given}SECRET-KEY")}, seen) as url:
        dom = Dom(run_chromium(tmp_path, f"{url}/frame", "--dump-dom"))
    body = [n for n in dom.nodes if n["tag"] == "body"][0]["attrs"]
    assert body["data-href"] == f"{url}/dashboard"  # no key in the address, so none in the history either
    assert body["data-status"] == "ok"
    fetches = [headers for path, headers in seen if path.startswith("/v1/experts")]
    assert fetches, seen
    for headers in fetches:  # the key went where it belongs, and nowhere else
        assert headers.get("Authorization") == "Bearer SECRET-KEY"
        assert "SECRET-KEY" not in headers.get("Referer", "")
    assert all("SECRET-KEY" not in headers.get("Referer", "") for _, headers in seen)


def test_the_page_is_served_without_a_key_and_with_no_referrer(loaded_app):
    url, _ = loaded_app
    r = httpx.get(f"{url}/dashboard", timeout=30)
    assert r.status_code == 200 and r.headers["referrer-policy"] == "no-referrer"
    assert httpx.get(f"{url}/v1/experts", timeout=30).status_code == 401  # the data still needs the key


@needs_chromium
def test_a_key_the_data_routes_refuse_shows_the_error_banner(loaded_app, tmp_path):
    url, _ = loaded_app
    dom = Dom(run_chromium(tmp_path, f"{url}/dashboard#key=WRONG", "--dump-dom"))
    banner = dom.by_id("banner")
    assert "hidden" not in banner["attrs"]
    assert text(banner).startswith("API key missing or wrong: open /dashboard#key=")
    assert "error" in classes(dom.by_id("status"))
    assert not [n for n in dom.inside("heatmap", "td") if "data-expert" in n["attrs"]]


@needs_chromium
def test_dashboard_screenshot_is_not_blank(loaded_app, tmp_path):
    url, _ = loaded_app
    shot = tmp_path / "dashboard.png"
    run_chromium(tmp_path, f"{url}/dashboard#key={API_KEY}", f"--screenshot={shot}", "--window-size=1280,900")
    pixels = png_rgb(shot)  # [H, W, 3]
    assert pixels.shape == (900, 1280, 3)
    packed = pixels.astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], np.uint32)  # [H, W] one int per colour
    colours, counts = np.unique(packed, return_counts=True)
    assert len(colours) > 200, f"only {len(colours)} colours"
    assert counts.max() / counts.sum() < 0.8, f"one colour covers {counts.max() / counts.sum():.0%} of the page"
    # The theme is greys and near-greys; the heatmap's cells are the one large area in strong colour.
    coloured = int(((pixels.max(axis=2).astype(int) - pixels.min(axis=2)) > 60).sum())
    assert coloured > 20_000, f"only {coloured} strongly coloured pixels: no heatmap drawn"
