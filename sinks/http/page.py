"""
The HTML status page served at ``/``.

The page is self-contained (inline CSS and script, no external assets) and
reads everything it shows from ``/v1/status`` every two seconds, so serving it
is handing out one constant: no templating, no state.
"""

from typing import Final

from aiohttp import web


async def index(request: web.Request) -> web.Response:
    """
    ``GET /``: a self-contained status page polling ``/v1/status``.
    """
    return web.Response(text=STATUS_PAGE, content_type="text/html")


STATUS_PAGE: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ebroker</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .5em; }
.ok { color: #186a2e; } .degraded { color: #a36200; }
.unhealthy, .shutting_down, .error { color: #b00020; }
table { border-collapse: collapse; margin-top: 1em; }
th, td { border-bottom: 1px solid #ddd; padding: .3em .8em; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
svg { border: 1px solid #ddd; background: #fafafa; }
</style>
</head>
<body>
<h1>ebroker <span id="instance"></span></h1>
<p>Health: <strong id="health">loading...</strong> <span id="reasons"></span></p>
<p>Pool: <span id="level">?</span> / <span id="capacity">?</span> bytes ready,
<span id="waiters">?</span> waiting</p>
<svg id="graph" width="480" height="100" viewBox="0 0 480 100" role="img"
 aria-label="pool level over time"><polyline id="line" fill="none" stroke="#2a6fdb"
 stroke-width="2" points=""/></svg>
<table>
<thead><tr><th>source</th><th>kind</th><th>tier</th><th>state</th><th>feeding</th>
<th>rate (B/s)</th><th>bytes in</th><th>reason</th></tr></thead>
<tbody id="sources"></tbody>
</table>
<script>
"use strict";
const history = [];
const keep = 120;
function cell(text, numeric) {
  const td = document.createElement("td");
  td.textContent = text;
  if (numeric) td.className = "n";
  return td;
}
function draw(capacity) {
  const points = history.map((level, i) => {
    const x = (i / (keep - 1)) * 480;
    const y = 100 - (capacity ? (level / capacity) * 96 : 0) - 2;
    return x.toFixed(1) + "," + y.toFixed(1);
  });
  document.getElementById("line").setAttribute("points", points.join(" "));
}
async function refresh() {
  const health = document.getElementById("health");
  try {
    const response = await fetch("/v1/status", {cache: "no-store"});
    const s = await response.json();
    document.getElementById("instance").textContent = s.instance + " " + s.version;
    health.textContent = s.health.status;
    health.className = s.health.status;
    document.getElementById("reasons").textContent = s.health.reasons.join("; ");
    document.getElementById("level").textContent = s.pool.level;
    document.getElementById("capacity").textContent = s.pool.capacity;
    document.getElementById("waiters").textContent = s.pool.waiters;
    history.push(s.pool.level);
    if (history.length > keep) history.shift();
    draw(s.pool.capacity);
    const rows = s.sources.map((src) => {
      const tr = document.createElement("tr");
      tr.append(cell(src.name), cell(src.kind), cell(src.priority, true),
        cell(src.state), cell(src.feeding ? "yes" : "no"),
        cell(Math.round(src.rate), true), cell(src.bytes_in, true), cell(src.reason));
      tr.className = src.state === "healthy" ? "ok" : "degraded";
      return tr;
    });
    document.getElementById("sources").replaceChildren(...rows);
  } catch (err) {
    health.textContent = "unreachable";
    health.className = "error";
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
"""
