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
function chart(id, series) {
  const svg = $(id), W = 400, H = 160, L = 44, B = 18;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const all = series.flatMap((s) => s.points);
  svg.dataset.points = String(all.length);
  const legend = $(id + "-legend");
  legend.replaceChildren();
  series.forEach((s, i) => {
    const swatch = document.createElement("i");
    swatch.style.background = COLORS[i % COLORS.length];
    legend.append(swatch, document.createTextNode(s.name));
  });
  if (!all.length) {
    const t = el("text", {x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#888"});
    t.textContent = "no data yet";
    svg.append(t);
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y1 = Math.max(...ys, 1e-9);
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - 6);
  const sy = (y) => H - B - y / y1 * (H - B - 8);
  svg.append(el("line", {x1: L, y1: H - B, x2: W, y2: H - B, stroke: "#999"}));
  svg.append(el("line", {x1: L, y1: 4, x2: L, y2: H - B, stroke: "#999"}));
  const top = el("text", {x: L - 4, y: 12, "text-anchor": "end", "font-size": 10});
  top.textContent = y1 >= 100 ? y1.toFixed(0) : y1.toPrecision(3);
  const zero = el("text", {x: L - 4, y: H - B, "text-anchor": "end", "font-size": 10});
  zero.textContent = "0";
  const when = el("text", {x: W - 4, y: H - 4, "text-anchor": "end", "font-size": 10});
  when.textContent = new Date(x1 * 1000).toLocaleTimeString();
  svg.append(top, zero, when);
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const d = s.points.map((p, j) => (j ? "L" : "M") + sx(p[0]).toFixed(1) + " " +
      sy(p[1]).toFixed(1)).join(" ");
    svg.append(el("path", {d, fill: "none", stroke: COLORS[i % COLORS.length],
      "stroke-width": 1.6, class: "series", "data-name": s.name,
      "data-n": String(s.points.length)}));
    for (const p of s.points.slice(-60)) {
      svg.append(el("circle", {cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2.2,
        fill: COLORS[i % COLORS.length]}));
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
    const line = (key) => buckets.filter((b) => b[key] !== null).map((b) => [t(b), b[key]]);
    chart("throughput", [{name: "requests", points: line("requests")},
      {name: "replies", points: line("replies")}]);
    chart("latency", [{name: "p50", points: line("latency_p50_ms")},
      {name: "p95", points: line("latency_p95_ms")},
      {name: "p99", points: line("latency_p99_ms")}]);
    chart("errors", [{name: "errors", points: line("errors")},
      {name: "denials", points: line("denials")},
      {name: "circuit openings", points: line("circuit_openings")}]);
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
