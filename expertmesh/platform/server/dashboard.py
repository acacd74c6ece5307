"""The /dashboard page: live expert load per MoE layer, which shard holds which expert, per-layer health
and the engine's figures, refreshed every 2 s from /v1/experts and /metrics.

One self-contained page (no CDN, fonts or scripts from elsewhere: a cluster often reaches nothing outside),
kept as a string so the package needs no data files. With API keys configured the page is opened as
`/dashboard?key=KEY`; its script reads that key and sends it as `Authorization: Bearer` on every fetch.
Everything taken from the server is written with textContent, never parsed as HTML.
"""

DASHBOARD_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>expertmesh · expert load</title>
<style>
:root { --bg:#0f1420; --panel:#171e2e; --line:#273149; --text:#dbe2f0; --dim:#8a96ad; --warn:#ffb547;
        --bad:#ff5d5d; --good:#4cd07d; color-scheme:dark; }
* { box-sizing:border-box; }
body { margin:0; padding:16px 22px; background:var(--bg); color:var(--text);
       font:14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header { display:flex; align-items:baseline; gap:18px; flex-wrap:wrap; }
h1 { font-size:20px; margin:0; } h1 span { color:var(--dim); font-weight:400; }
h2 { font-size:15px; margin:0 0 10px; font-weight:600; }
#meta { color:var(--dim); } #meta b { color:var(--text); font-weight:600; }
#status { margin-left:auto; color:var(--dim); font-variant-numeric:tabular-nums; }
#status.ok::before { content:"● "; color:var(--good); }
#status.error { color:var(--bad); } #status.error::before { content:"● "; }
#banner { margin:12px 0 0; padding:10px 14px; border-radius:6px; background:#4a1820; border:1px solid var(--bad);
          color:#ffd9d9; font-weight:600; }
main.stale { opacity:.55; }
.cards { display:grid; grid-template-columns:repeat(4, 1fr); gap:12px; margin:14px 0; }
.card, .panel { background:var(--panel); border:1px solid var(--line); border-radius:8px; padding:12px 14px; }
.label { color:var(--dim); font-size:12px; text-transform:uppercase; letter-spacing:.05em; }
.value { font-size:24px; font-weight:600; font-variant-numeric:tabular-nums; }
.bar { height:6px; background:var(--line); border-radius:3px; overflow:hidden; margin-top:6px; }
.bar > i { display:block; height:100%; background:#5b8def; width:0; }
.panel { margin-bottom:14px; }
.panel-head { display:flex; align-items:center; gap:18px; flex-wrap:wrap; margin-bottom:10px; }
.panel-head h2 { margin:0; }
select { background:var(--bg); color:var(--text); border:1px solid var(--line); border-radius:4px; padding:2px 6px; }
.scroll { overflow-x:auto; }
#legend { display:flex; align-items:center; gap:8px; color:var(--dim); font-size:12px; margin-left:auto; }
#legend-scale { margin:0 14px; padding-top:12px; }
#legend-ramp { width:220px; height:12px; border-radius:3px; }
#legend-ticks { position:relative; width:220px; height:14px; }
#legend-ticks span { position:absolute; transform:translateX(-50%); font-size:11px; }
.swatch { display:inline-block; width:14px; height:12px; border-radius:2px; vertical-align:middle; }
.idle-swatch { border:1px dashed #55617a; background:#2b3449; }
table { border-collapse:collapse; font-variant-numeric:tabular-nums; }
#heatmap { border-collapse:separate; border-spacing:3px; width:100%; }
#heatmap th { color:var(--dim); font-weight:500; font-size:12px; padding:0 4px; white-space:nowrap; }
#heatmap th.corner { width:96px; text-align:right; }
#heatmap tbody th { text-align:right; white-space:nowrap; }
#heatmap td.cell { min-width:52px; height:44px; text-align:center; border-radius:4px; padding:2px 3px;
                   border:1px solid transparent; cursor:default; }
#heatmap td.cell .n { display:block; font-weight:600; font-size:13px; }
#heatmap td.cell .sh { display:block; font-size:10px; opacity:.8; }
#heatmap td.idle { border:1px dashed #55617a; color:var(--dim); }
#heatmap td.busiest { border:2px solid #fff; }
#heatmap td.rep .sh { font-weight:700; opacity:1; }
#heatmap.dense { table-layout:fixed; border-spacing:1px; }
#heatmap.dense thead th { font-size:10px; overflow:visible; padding:0; }
#heatmap.dense thead th.corner { font-size:12px; padding:0 4px; }
#heatmap.dense td.cell { min-width:0; height:20px; padding:0; border-radius:2px; }
#heatmap.dense td.idle { border:none; background:#2b3449; }
#heatmap.dense td.busiest { border:1px solid #fff; }
#heatmap.dense td.cell span { display:none; }
.note { color:var(--dim); font-size:12px; margin:8px 0 0; }
.grid2 { display:grid; grid-template-columns:3fr 2fr; gap:14px; }
#health, #shards { width:100%; }
#health th, #shards th { text-align:left; color:var(--dim); font-weight:500; font-size:12px; padding:4px 8px;
                        border-bottom:1px solid var(--line); }
#health td, #shards td { padding:5px 8px; border-bottom:1px solid var(--line); white-space:nowrap; }
#health th, #shards th { white-space:nowrap; }
#health td:first-child { white-space:normal; }
#health tr.warn td:first-child { box-shadow:inset 3px 0 0 var(--warn); }
#health td.bad { color:var(--warn); font-weight:700; }
.flag { display:inline-block; margin-left:6px; padding:0 6px; border-radius:8px; font-size:11px; font-weight:700;
        background:var(--warn); color:#261a00; }
.inline-bar { display:inline-block; width:60px; height:6px; background:var(--line); border-radius:3px;
              vertical-align:middle; margin-left:6px; overflow:hidden; }
.inline-bar > i { display:block; height:100%; background:#5b8def; }
.bad .inline-bar > i { background:var(--warn); }
</style>
</head>
<body>
<header>
  <h1>expertmesh <span>expert load</span></h1>
  <div id="meta"></div>
  <div id="status">connecting…</div>
</header>
<div id="banner" hidden></div>
<main>
<section id="engine" class="cards">
  <div class="card"><div class="label">requests running</div><div class="value" id="m-running">–</div></div>
  <div class="card"><div class="label">requests waiting</div><div class="value" id="m-waiting">–</div></div>
  <div class="card"><div class="label">tokens / s (last 10 s)</div><div class="value" id="m-tps">–</div></div>
  <div class="card"><div class="label">KV-cache blocks used</div><div class="value" id="m-kv">–</div>
    <div class="bar"><i id="m-kv-bar"></i></div></div>
</section>
<section class="panel">
  <div class="panel-head">
    <h2>Expert load</h2>
    <label>counts <select id="scope"><option value="window">recent window</option>
      <option value="total">since start</option></select></label>
    <div id="legend"><span>share of the layer's tokens</span>
      <div id="legend-scale"><div id="legend-ramp"></div><div id="legend-ticks"></div></div>
      <span><span class="swatch idle-swatch"></span> idle</span></div>
  </div>
  <div class="scroll"><table id="heatmap"></table></div>
  <p class="note" id="heatmap-note"></p>
</section>
<div class="grid2">
  <section class="panel"><h2>Layer health <span class="label">(recent window)</span></h2>
    <table id="health"><thead><tr><th>layer</th><th>tokens</th><th>busiest expert</th><th>its share</th>
      <th>max / mean</th><th>entropy</th><th>idle experts</th></tr></thead><tbody></tbody></table></section>
  <section class="panel"><h2>Shards</h2>
    <table id="shards"><thead><tr><th>shard</th><th>experts held</th><th>replicated</th>
      <th>share of routed pairs</th></tr></thead><tbody></tbody></table></section>
</div>
</main>
<script>
"use strict";
const KEY = new URLSearchParams(location.search).get("key");
const HEADERS = KEY ? {Authorization: "Bearer " + KEY} : {};
const REFRESH_MS = 2000, BUSIEST_WARN = 0.4, ENTROPY_WARN = 0.5;
const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];  // viridis
const $ = id => document.getElementById(id);
let shape = "", last = null, lastTime = "", busy = false;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
const pct = x => (100 * x).toFixed(x > 0 && x < 0.1 ? 1 : 0) + "%";
// sqrt scale: an even share (top_k / num_experts, often 5-25%) lands mid-ramp instead of at its dark end
const rampPos = share => Math.sqrt(Math.min(Math.max(share, 0), 1));
function colour(share) {
  const t = rampPos(share) * (RAMP.length - 1), i = Math.min(Math.floor(t), RAMP.length - 2), f = t - i;
  const c = RAMP[i].map((v, j) => Math.round(v + (RAMP[i + 1][j] - v) * f));
  return {bg: `rgb(${c})`, fg: 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 140 ? "#111" : "#fff"};
}

function drawLegend() {
  const stops = [];
  for (let s = 0; s <= 10; s++) stops.push(colour((s / 10) ** 2).bg + " " + s * 10 + "%");
  $("legend-ramp").style.background = `linear-gradient(to right, ${stops.join(", ")})`;
  for (const s of [0, 0.05, 0.25, 0.5, 1]) {
    const t = el("span", null, pct(s));
    t.style.left = 100 * rampPos(s) + "%";
    $("legend-ticks").append(t);
  }
}

class FetchError extends Error {}

async function get(path) {
  let r;
  try {
    r = await fetch(path, {headers: HEADERS, cache: "no-store"});
  } catch (e) {
    throw new FetchError(`server unreachable (GET ${path}): ${e.message}`);
  }
  if (r.status === 401) throw new FetchError("API key missing or wrong: open /dashboard?key=YOUR_KEY");
  if (!r.ok) {
    let detail = "";
    try { detail = (await r.json()).error.message; } catch (e) { /* not our JSON error body */ }
    throw new FetchError(`GET ${path} failed: HTTP ${r.status}${detail ? " (" + detail + ")" : ""}`);
  }
  return r;
}

function parseMetrics(text) {  // Prometheus text format: unlabelled samples only
  const out = {};
  for (const line of text.split("\n")) {
    const m = /^([A-Za-z_:][\w:]*)\s+(\S+)/.exec(line);
    if (m) out[m[1]] = Number(m[2]);
  }
  return out;
}

function buildHeatmap(layers, numExperts) {
  const t = $("heatmap");
  t.replaceChildren();
  t.classList.toggle("dense", numExperts > 32);
  const head = t.createTHead().insertRow();
  head.append(el("th", "corner", "layer \\ expert"));
  const every = numExperts > 128 ? 16 : numExperts > 32 ? 8 : 1;  // dense maps: label every 8th or 16th column
  for (let e = 0; e < numExperts; e++) head.append(el("th", null, e % every ? "" : String(e)));
  const body = t.createTBody();
  for (const layer of layers) {
    const row = body.insertRow();
    row.append(el("th", null, "layer " + layer));
    for (let e = 0; e < numExperts; e++) {
      const td = row.insertCell();
      td.className = "cell";
      td.dataset.layer = layer;
      td.dataset.expert = e;
      td.append(el("span", "n"), el("span", "sh"));
    }
  }
}

function renderHeatmap(d) {
  const layers = d.placement.moe_layers, n = d.num_experts, scope = $("scope").value;
  if (shape !== layers.join(",") + "x" + n) { shape = layers.join(",") + "x" + n; buildHeatmap(layers, n); }
  const busiest = Object.fromEntries(d.health.map(h => [h.layer, h.routed_pairs ? h.busiest_expert : -1]));
  for (const td of $("heatmap").querySelectorAll("td.cell")) {
    const layer = td.dataset.layer, e = Number(td.dataset.expert);
    const counts = d.load[scope][layer] || [];
    const count = counts[e] || 0, pairs = counts.reduce((a, b) => a + b, 0);
    const share = pairs ? count / (pairs / d.top_k) : 0;  // of the layer's tokens: each token picks top_k
    const shards = d.placement.replicas[layer + ":" + e] || [];
    const c = colour(share);
    td.dataset.count = count;
    td.dataset.share = share.toFixed(4);
    td.style.background = count ? c.bg : "transparent";
    td.style.color = count ? c.fg : "";
    td.classList.toggle("idle", !count);
    td.classList.toggle("rep", shards.length > 1);
    td.classList.toggle("busiest", scope === "window" && busiest[layer] === e);
    td.children[0].textContent = count;
    td.children[1].textContent = shards.length ? "s" + shards.join(",") : "no shard";
    td.title = `layer ${layer}, expert ${e}: ${count} tokens (${pct(share)} of the layer's tokens)\n` +
               (shards.length > 1 ? `replicated on shards ${shards.join(", ")}`
                                  : `on shard ${shards.join("") || "none"}`);
  }
  const what = n > 32 ? "hover a cell for its count and the shards holding it"
                      : "the count and, under it, the shards holding the expert (bold when replicated)";
  const when = scope === "window" ? "recent window" : "since start";
  $("heatmap-note").textContent = `Tokens routed to each expert (${when}): ` +
    `${what}. An even spread gives each expert ` +
    `${pct(d.top_k / n)} of its layer's tokens (top-${d.top_k} of ${n}). White outline: the layer's busiest expert.`;
}

function flag(text, why) {
  const f = el("span", "flag", text);
  f.title = why;
  return f;
}

function renderHealth(d) {
  const body = $("health").tBodies[0];
  body.replaceChildren();
  for (const h of d.health) {
    const row = body.insertRow();
    const hot = h.busiest_share > BUSIEST_WARN, flat = h.routed_pairs > 0 && h.entropy < ENTROPY_WARN;
    row.dataset.layer = h.layer;
    row.classList.toggle("warn", hot || flat);
    const name = row.insertCell();
    name.textContent = "layer " + h.layer;
    if (hot) name.append(flag("hot expert", `expert ${h.busiest_expert} takes ${pct(h.busiest_share)} of the ` +
                              `layer's tokens (warning above ${pct(BUSIEST_WARN)})`));
    if (flat) name.append(flag("collapsed routing", `routing entropy ${h.entropy.toFixed(2)} ` +
                               `(warning below ${ENTROPY_WARN}): tokens crowd onto a few experts`));
    row.insertCell().textContent = h.tokens;
    row.insertCell().textContent = h.routed_pairs ? "expert " + h.busiest_expert : "–";
    const share = row.insertCell();
    share.textContent = pct(h.busiest_share);
    const bar = el("span", "inline-bar"), fill = el("i");
    fill.style.width = pct(Math.min(h.busiest_share, 1));
    bar.append(fill); share.append(bar);
    share.classList.toggle("bad", hot);
    row.insertCell().textContent = h.max_over_mean.toFixed(2) + "×";
    const ent = row.insertCell();
    ent.textContent = h.entropy.toFixed(2);
    ent.classList.toggle("bad", flat);
    row.insertCell().textContent = h.idle_experts + " / " + d.num_experts;
  }
}

function renderShards(d) {
  const held = new Map(), scope = $("scope").value;
  let all = 0;
  for (const [id, shards] of Object.entries(d.placement.replicas)) {
    const [layer, e] = id.split(":");
    const count = ((d.load[scope][layer] || [])[Number(e)] || 0);
    all += count;
    for (const s of shards) {  // a replicated expert's tokens counted as split evenly over its replicas
      const row = held.get(s) || {experts: 0, replicated: 0, load: 0};
      row.experts += 1; row.replicated += shards.length > 1; row.load += count / shards.length;
      held.set(s, row);
    }
  }
  const body = $("shards").tBodies[0];
  body.replaceChildren();
  for (const s of [...held.keys()].sort((a, b) => a - b)) {
    const h = held.get(s), row = body.insertRow(), share = all ? h.load / all : 0;
    row.dataset.shard = s;
    row.insertCell().textContent = "shard " + s;
    row.insertCell().textContent = h.experts;
    row.insertCell().textContent = h.replicated;
    const cell = row.insertCell();
    cell.textContent = pct(share);
    const bar = el("span", "inline-bar"), fill = el("i");
    fill.style.width = pct(share);
    bar.append(fill); cell.append(bar);
  }
}

function renderMeta(d) {
  const meta = $("meta");
  meta.replaceChildren();
  for (const [k, v] of [["model", d.model], ["mode", d.mode], ["experts", d.num_experts], ["top-k", d.top_k],
                        ["shards", d.placement.num_shards], ["placement v", d.placement.version]]) {
    meta.append(k + " ", el("b", null, String(v)), "   ");
  }
}

function renderEngine(m) {
  const fig = (id, v, text) => { $(id).textContent = v === undefined ? "–" : text; $(id).dataset.value = v ?? ""; };
  fig("m-running", m.expertmesh_requests_running, String(m.expertmesh_requests_running));
  fig("m-waiting", m.expertmesh_requests_waiting, String(m.expertmesh_requests_waiting));
  const tps = m.expertmesh_generation_tokens_per_second;
  fig("m-tps", tps, tps === undefined ? "" : tps.toFixed(1));
  const used = m.expertmesh_kv_cache_blocks_used, total = m.expertmesh_kv_cache_blocks_total;
  fig("m-kv", used, `${used} / ${total}`);
  $("m-kv").dataset.total = total ?? "";
  $("m-kv-bar").style.width = total ? pct(used / total) : "0";
}

function render() {
  if (!last) return;
  renderMeta(last);
  renderHeatmap(last);
  renderHealth(last);
  renderShards(last);
}

function showError(message) {
  $("banner").textContent = message;
  $("banner").hidden = false;
  $("status").className = "error";
  $("status").textContent = "update failed at " + new Date().toLocaleTimeString() +
                           (last ? " — showing data from " + lastTime : "");
  document.querySelector("main").classList.add("stale");
}

async function refresh() {
  if (busy) return;  // a slow server: skip a tick rather than pile up requests
  busy = true;
  try {
    const [experts, metrics] = await Promise.all([get("/v1/experts"), get("/metrics")]);
    last = await experts.json();
    renderEngine(parseMetrics(await metrics.text()));
    render();
    $("banner").hidden = true;
    $("status").className = "ok";
    lastTime = new Date().toLocaleTimeString();
    $("status").textContent = "updated " + lastTime;
    document.querySelector("main").classList.remove("stale");
  } catch (e) {
    showError(e instanceof FetchError ? e.message : "dashboard error: " + e.message);
  } finally {
    busy = false;
  }
}

drawLegend();
$("scope").addEventListener("change", render);
refresh();
setInterval(refresh, REFRESH_MS);
</script>
</body>
</html>
"""
