"""Safe HTML for what users and models wrote: everything is text, nothing is markup."""

from __future__ import annotations

import html
from collections.abc import Iterable

from actors.ports import ChatMessage

# No script, style or plugin may run on these pages, whatever a reply contains.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; base-uri 'none';"
    " form-action 'none'"
)


def text_html(text: str) -> str:
    """`text` as HTML that shows exactly those characters (escaped; line breaks kept)."""
    return html.escape(text, quote=True).replace("\n", "<br>")


def transcript_html(context_id: str, messages: Iterable[ChatMessage]) -> str:
    """A conversation as a self-contained HTML page; model replies are never trusted as HTML."""
    rows = "\n".join(
        f'<div class="msg {html.escape(m.role)}"><b>{html.escape(m.role)}</b>'
        f"<p>{text_html(m.content)}</p></div>"
        for m in messages
    )
    title = text_html(context_id)
    return (
        '<!doctype html><html><head><meta charset="utf-8">'
        f"<title>{title}</title><style>body{{font:14px sans-serif;max-width:50em;margin:2em auto}}"
        ".msg{margin:1em 0}.user b{color:#246}.assistant b{color:#462}</style></head>"
        f"<body><h1>Context {title}</h1>\n{rows}\n</body></html>"
    )


_DASHBOARD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>chat-llm dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:13px system-ui,sans-serif;margin:0;background:#f6f7f9;color:#222}
header{display:flex;gap:1em;align-items:center;padding:.6em 1em;background:#1d2733;color:#fff}
header h1{font-size:16px;margin:0 1em 0 0}header input{width:14em}
header span{margin-left:auto;opacity:.8}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px;padding:12px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:8px 10px}
section h2{font-size:13px;margin:0 0 6px}svg{width:100%;height:170px;display:block}
.legend{font-size:11px}.legend i{display:inline-block;width:10px;height:3px;margin:0 4px 2px 8px}
table{border-collapse:collapse;width:100%;font-size:12px}td,th{border-bottom:1px solid #eee;
padding:2px 4px;text-align:left}.num{font-size:22px;font-weight:600}
</style></head><body>
<header><h1>chat-llm</h1>
<label>tenant <input id="tenant" placeholder="(default)"></label>
<label>API key <input id="key" type="password" placeholder="(none)"></label>
<label>window <select id="window"><option value="300">5 min</option>
<option value="900" selected>15 min</option><option value="3600">1 h</option></select></label>
<span id="status">loading</span></header>
<main>
<section><h2>Throughput (requests per 10 s)</h2><svg id="throughput"></svg>
<div class="legend" id="throughput-legend"></div></section>
<section><h2>Reply latency (ms)</h2><svg id="latency"></svg>
<div class="legend" id="latency-legend"></div></section>
<section><h2>Errors, denials, circuit openings</h2><svg id="errors"></svg>
<div class="legend" id="errors-legend"></div></section>
<section><h2>Sentiment of messages received (per 10 s)</h2><svg id="sentiment"></svg>
<div class="legend" id="sentiment-legend"></div></section>
<section><h2>Projection lag (s, live)</h2><svg id="lag"></svg>
<div class="legend" id="lag-legend"></div></section>
<section><h2>Model usage (replies in the window)</h2><table id="models"><tbody></tbody></table>
</section>
<section><h2>Totals in the window</h2><table id="totals"><tbody></tbody></table></section>
<section style="grid-column:1/-1"><h2>Anomalies</h2><table id="anomalies"><thead><tr>
<th>at</th><th>detector</th><th>subject</th><th>observed</th><th>threshold</th><th>detail</th>
</tr></thead><tbody></tbody></table></section>
</main>
<script nonce="__NONCE__">
"use strict";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];
const lagHistory = {};
const $ = (id) => document.getElementById(id);
function headers() {
  const h = {};
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  if ($("tenant").value) h["X-Tenant-Id"] = $("tenant").value;
  return h;
}
async function get(path) {
  const r = await fetch(path, {headers: headers()});
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}
function el(name, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  return e;
}
// A round top for the y axis: 1, 2 or 5 times a power of ten, and 1 when all is 0 (the
// axis of an empty error chart reads 0..1, not 0..1e-9).
function niceTop(y) {
  if (!(y > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(y)));
  for (const m of [1, 2, 5, 10]) if (y <= m * p) return m * p;
  return 10 * p;
}
function label(y) {
  return Number.isInteger(y) ? String(y) : y >= 10 ? y.toFixed(0) : String(+y.toPrecision(2));
}
// Time labels every 1 s .. 2 h, whichever gives at most six of them over the span.
const STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200];
function timeTicks(x0, x1) {
  const step = STEPS.find((s) => (x1 - x0) / s <= 6) || STEPS[STEPS.length - 1];
  const ticks = [];
  for (let t = Math.ceil(x0 / step) * step; t <= x1; t += step) ticks.push(t);
  const opts = {hour: "2-digit", minute: "2-digit", hour12: false};
  if (step < 60) opts.second = "2-digit";
  return ticks.map((t) => [t, new Date(t * 1000).toLocaleTimeString([], opts)]);
}
// `span`: [x0, x1] in seconds; by default the span of the points.
function chart(id, series, span) {
  const svg = $(id), W = 400, H = 160, L = 44, B = 18;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const all = series.flatMap((s) => s.points);
  svg.dataset.points = String(all.length);
  const legend = $(id + "-legend");
  legend.replaceChildren();
  const color = (s, i) => s.color || COLORS[i % COLORS.length];
  series.forEach((s, i) => {
    const swatch = document.createElement("i");
    swatch.style.background = color(s, i);
    legend.append(swatch, document.createTextNode(s.name));
  });
  if (!all.length) {
    const t = el("text", {x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#888"});
    t.textContent = "no data yet";
    svg.append(t);
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = span ? span[0] : Math.min(...xs);
  const x1 = Math.max(span ? span[1] : Math.max(...xs), x0 + 1);
  const y1 = niceTop(Math.max(...ys));
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - 6);
  const sy = (y) => H - B - y / y1 * (H - B - 8);
  for (const y of [0, y1 / 2, y1]) {
    svg.append(el("line", {x1: L, y1: sy(y), x2: W - 6, y2: sy(y),
      stroke: y ? "#eee" : "#999"}));
    if (y === y1 / 2 && !Number.isInteger(y) && y1 >= 1) continue;  // no "0.5" on counts
    const t = el("text", {x: L - 4, y: sy(y) + 3, "text-anchor": "end", "font-size": 10,
      class: "y-label"});
    t.textContent = label(y);
    svg.append(t);
  }
  svg.append(el("line", {x1: L, y1: 4, x2: L, y2: H - B, stroke: "#999"}));
  for (const [t, text] of timeTicks(x0, x1)) {
    svg.append(el("line", {x1: sx(t), y1: H - B, x2: sx(t), y2: H - B + 3, stroke: "#999"}));
    const x = el("text", {x: sx(t), y: H - 4, "text-anchor": "middle", "font-size": 10,
      class: "x-label"});
    x.textContent = text;
    svg.append(x);
  }
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const d = s.points.map((p, j) => (j ? "L" : "M") + sx(p[0]).toFixed(1) + " " +
      sy(p[1]).toFixed(1)).join(" ");
    svg.append(el("path", {d, fill: "none", stroke: color(s, i),
      "stroke-width": 1.6, class: "series", "data-name": s.name,
      "data-n": String(s.points.length)}));
    for (const p of s.points.filter((p) => p[1] > 0).slice(-60)) {
      svg.append(el("circle", {cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2,
        fill: color(s, i)}));
    }
  });
}
function rows(id, cells) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  for (const row of cells) {
    const tr = document.createElement("tr");
    for (const c of row) {
      const td = document.createElement("td");
      td.textContent = c === null || c === undefined ? "" : String(c);
      tr.append(td);
    }
    body.append(tr);
  }
}
async function refresh() {
  const windowS = Number($("window").value);
  const since = new Date(Date.now() - windowS * 1000).toISOString();
  try {
    const [buckets, anomalies, live] = await Promise.all([
      get(`/v1/analytics?bucket_s=10&since=${encodeURIComponent(since)}`),
      get(`/v1/anomalies?limit=50&since=${encodeURIComponent(since)}`),
      get("/v1/live"),
    ]);
    const t = (b) => Date.parse(b.bucket.endsWith("Z") || b.bucket.includes("+") ?
      b.bucket : b.bucket + "Z") / 1000;
    // Counts: every 10 s bucket of the window, 0 where nothing happened (the store only
    // returns buckets with events). Latency: only the buckets that had replies.
    const end = Math.floor(Date.now() / 10000) * 10, start = end - windowS, span = [start, end];
    const byTime = new Map(buckets.map((b) => [t(b), b]));
    const count = (get) => {
      const points = [];
      for (let at = Math.ceil(start / 10) * 10; at <= end; at += 10) {
        const b = byTime.get(at);
        points.push([at, b ? get(b) : 0]);
      }
      return points;
    };
    const line = (key) => buckets.filter((b) => b[key] !== null).map((b) => [t(b), b[key]]);
    chart("throughput", [{name: "requests", points: count((b) => b.requests)},
      {name: "replies", points: count((b) => b.replies)}], span);
    chart("latency", [{name: "p50", points: line("latency_p50_ms")},
      {name: "p95", points: line("latency_p95_ms")},
      {name: "p99", points: line("latency_p99_ms")}], span);
    chart("errors", [{name: "errors", points: count((b) => b.errors)},
      {name: "denials", points: count((b) => b.denials)},
      {name: "circuit openings", points: count((b) => b.circuit_openings)}], span);
    const mood = (label) => count((b) => (b.sentiment || {})[label] || 0);
    chart("sentiment", [{name: "positive", points: mood("positive"), color: "#16a34a"},
      {name: "neutral", points: mood("neutral"), color: "#9ca3af"},
      {name: "negative", points: mood("negative"), color: "#dc2626"}], span);
    const now = Date.now() / 1000;
    for (const [name, lag] of Object.entries(live.lag)) {
      (lagHistory[name] = lagHistory[name] || []).push([now, lag.p99_s]);
      if (lagHistory[name].length > 300) lagHistory[name].shift();
    }
    chart("lag", Object.entries(lagHistory).map(([name, points]) =>
      ({name: name + " p99", points})));
    const models = {};
    let requests = 0, replies = 0, tokens = 0, errors = 0, denials = 0;
    for (const b of buckets) {
      for (const [m, n] of Object.entries(b.models)) models[m] = (models[m] || 0) + n;
      requests += b.requests; replies += b.replies; tokens += b.tokens;
      errors += b.errors; denials += b.denials;
    }
    rows("models", Object.entries(models).sort((a, b) => b[1] - a[1]));
    rows("totals", [["requests", requests], ["replies", replies], ["tokens", tokens],
      ["errors", errors], ["rate-limit denials", denials],
      ["archived (this worker)", live.archived], ["anomalies found", live.findings]]);
    rows("anomalies", anomalies.map((a) => [a.at, a.detector, a.subject, a.observed,
      a.threshold, a.detail]));
    $("status").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.updated = String(Date.now());
  } catch (err) {
    $("status").textContent = String(err);
  }
}
refresh();
setInterval(refresh, 2000);
</script></body></html>
"""


def dashboard_html() -> tuple[str, str]:
    """The dashboard page and its Content-Security-Policy: only its own script (by nonce)
    runs, it talks only to this origin, and every value it shows is set as text."""
    import secrets

    nonce = secrets.token_urlsafe(16)
    csp = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline';"
        " connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none';"
        " frame-ancestors 'none'"
    )
    return _DASHBOARD.replace("__NONCE__", nonce), csp
