"use strict";
// The operator's status page. It polls /v1/status every 2 s and, when the
// broker keeps history, loads the last hour of /v1/history once and then only
// what is new. Without history the graphs and the event list are built from
// the status polls of this open tab alone. No library: plain DOM and SVG.

const STATUS_MS = 2000;
const HIDDEN_MS = 10000;
const WINDOW_S = 3600;
const HISTORY_RETRY_MS = 300000;
const FETCH_TIMEOUT_MS = 5000;
// The SVG namespace, taken from the page's own charts rather than spelled out.
const SVG = document.querySelector("svg").namespaceURI;

// ---- formatting -----------------------------------------------------------

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

function fmtBytes(n) {
  if (n === null || n === undefined || !Number.isFinite(n)) return "\u2014";
  let i = 0;
  let v = Math.abs(n);
  while (v >= 1024 && i < UNITS.length - 1) {
    v /= 1024;
    i += 1;
  }
  const digits = i === 0 || v >= 100 ? 0 : v >= 10 ? 1 : 2;
  return (n < 0 ? "-" : "") + v.toFixed(digits) + " " + UNITS[i];
}

// Axis labels: "16 KiB" rather than "16.0 KiB".
function fmtAxis(n) {
  return fmtBytes(n).replace(/\.0+ /, " ");
}

function fmtRate(n) {
  return n === null || n === undefined ? "\u2014" : fmtBytes(n) + "/s";
}

function fmtCount(n) {
  return n === null || n === undefined ? "\u2014" : Math.round(n).toLocaleString("en-US");
}

function pad(n) {
  return String(n).padStart(2, "0");
}

function fmtClock(t, seconds) {
  const d = new Date(t * 1000);
  const hm = pad(d.getHours()) + ":" + pad(d.getMinutes());
  return seconds ? hm + ":" + pad(d.getSeconds()) : hm;
}

function fmtDuration(s) {
  if (!Number.isFinite(s)) return "?";
  s = Math.max(0, Math.floor(s));
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  if (d) return d + " d " + h + " h";
  if (h) return h + " h " + pad(m) + " min";
  if (m) return m + " min " + pad(s % 60) + " s";
  return s + " s";
}

// ---- DOM helpers ----------------------------------------------------------

function $(id) {
  return document.getElementById(id);
}

function setText(id, text) {
  const el = $(id);
  if (el.textContent !== text) el.textContent = text;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function td(text, cls, label) {
  return el("td", { class: cls, "data-label": label }, text === undefined ? "" : String(text));
}

const STATE_CLASS = {
  healthy: "ok",
  ok: "ok",
  starting: "warn",
  quarantined: "warn",
  stalled: "warn",
  degraded: "warn",
  failed: "bad",
  unhealthy: "bad",
  stopped: "idle",
};

function stateBadge(state) {
  const cls = STATE_CLASS[state] || "warn";
  return el("span", { class: "state st-" + cls }, state || "unknown");
}

// ---- series: history from the broker, or what this tab has seen -----------

// Each series is {times: [...], values: [...]} with null for "no data".
const emptySeries = () => ({ times: [], values: [] });
const live = { level: emptySeries(), inRate: emptySeries(), outRate: emptySeries(), sources: {}, customers: {} };
let prev = null;
const derivedEvents = [];

const recorded = {
  state: "loading", // "loading" | "ok" | "absent" | "error"
  step: 10,
  times: [],
  pool: {},
  sources: {},
  customers: {},
  events: [],
  nextFetch: 0,
};

function pushLive(series, t, value) {
  series.times.push(t);
  series.values.push(value);
  while (series.times.length && series.times[0] < t - WINDOW_S) {
    series.times.shift();
    series.values.shift();
  }
}

function liveSeries(map, key) {
  if (!map[key]) map[key] = emptySeries();
  return map[key];
}

function observe(s) {
  const t = s.time;
  const dt = prev ? t - prev.time : 0;
  const perSecond = (now, before) =>
    dt > 0 && Number.isFinite(now) && Number.isFinite(before) ? Math.max(0, (now - before) / dt) : null;
  pushLive(live.level, t, s.pool.level);
  pushLive(live.inRate, t, prev ? perSecond(s.pool.bytes_in, prev.pool.bytes_in) : null);
  pushLive(live.outRate, t, prev ? perSecond(s.pool.bytes_out, prev.pool.bytes_out) : null);
  for (const src of s.sources) pushLive(liveSeries(live.sources, src.name), t, src.rate);
  const customers = s.accounts?.customers || {};
  const before = prev?.accounts?.customers || {};
  for (const [id, c] of Object.entries(customers)) {
    const rate = before[id] ? perSecond(c.bytes_served, before[id].bytes_served) : null;
    pushLive(liveSeries(live.customers, id), t, rate);
  }
  if (prev) deriveEvents(prev, s);
  prev = s;
}

function deriveEvents(a, b) {
  const add = (kind, subject, from, to, reason) => {
    derivedEvents.push({ time: b.time, kind, subject, from, to, reason });
    if (derivedEvents.length > 200) derivedEvents.shift();
  };
  const old = Object.fromEntries(a.sources.map((x) => [x.name, x]));
  for (const src of b.sources) {
    const was = old[src.name];
    if (was && was.state !== src.state) add("source_state", src.name, was.state, src.state, src.reason);
  }
  if (a.tiers.active_tier !== b.tiers.active_tier) {
    add("tier_change", "pool", String(a.tiers.active_tier), String(b.tiers.active_tier), "");
  }
  if (b.tiers.failovers > a.tiers.failovers) add("failover", "pool", "", "", "");
  if (a.phase !== b.phase) add("phase", "broker", a.phase, b.phase, "");
}

function historyUrl() {
  if (recorded.times.length === 0) return "/v1/history?resolution=10s&last=" + WINDOW_S;
  return "/v1/history?resolution=10s&since=" + recorded.times[recorded.times.length - 1];
}

// Cut every series of `group` at `cut`, pad it to `length` with nulls.
function cutSeries(group, cut, length) {
  for (const entry of Object.values(group)) {
    for (const [k, v] of Object.entries(entry)) {
      if (!Array.isArray(v)) continue;
      v.length = Math.min(v.length, cut);
      while (v.length < length) v.push(null);
    }
  }
}

function appendSeries(group, incoming, cut, base) {
  for (const [name, entry] of Object.entries(incoming || {})) {
    if (!group[name]) group[name] = {};
    const into = group[name];
    for (const [k, v] of Object.entries(entry)) {
      if (!Array.isArray(v)) {
        into[k] = v;
        continue;
      }
      if (!into[k]) into[k] = new Array(cut).fill(null);
      into[k].length = Math.min(into[k].length, cut);
      while (into[k].length < cut) into[k].push(null);
      into[k].push(...v);
    }
    for (const v of Object.values(into)) {
      if (Array.isArray(v)) while (v.length < base) v.push(null);
    }
  }
}

function mergeHistory(doc) {
  const step = Number(doc.step) || 10;
  const n = Number(doc.points) || 0;
  recorded.step = step;
  const times = Array.from({ length: n }, (_, i) => doc.start + i * step);
  // Points at or after the first new one are replaced by the new answer.
  let cut = recorded.times.findIndex((t) => t >= doc.start - step / 2);
  if (cut < 0) cut = recorded.times.length;
  recorded.times.length = cut;
  recorded.times.push(...times);
  const total = recorded.times.length;
  cutSeries(recorded.sources, cut, cut);
  cutSeries(recorded.customers, cut, cut);
  for (const k of Object.keys(recorded.pool)) recorded.pool[k].length = cut;
  appendSeries(recorded.sources, doc.sources, cut, total);
  appendSeries(recorded.customers, doc.customers, cut, total);
  for (const [k, v] of Object.entries(doc.pool || {})) {
    if (!recorded.pool[k]) recorded.pool[k] = new Array(cut).fill(null);
    recorded.pool[k].push(...v);
  }
  for (const group of [recorded.sources, recorded.customers]) {
    for (const entry of Object.values(group)) {
      for (const v of Object.values(entry)) if (Array.isArray(v)) while (v.length < total) v.push(null);
    }
  }
  for (const v of Object.values(recorded.pool)) while (v.length < total) v.push(null);
  // Keep the last hour.
  let drop = recorded.times.findIndex((t) => t >= doc.now - WINDOW_S);
  if (drop < 0) drop = recorded.times.length;
  if (drop > 0) {
    recorded.times.splice(0, drop);
    for (const v of Object.values(recorded.pool)) v.splice(0, drop);
    for (const group of [recorded.sources, recorded.customers]) {
      for (const entry of Object.values(group)) {
        for (const v of Object.values(entry)) if (Array.isArray(v)) v.splice(0, drop);
      }
    }
  }
  const seen = new Set(recorded.events.map(eventKey));
  for (const e of doc.events || []) if (!seen.has(eventKey(e))) recorded.events.push(e);
  recorded.events = recorded.events.filter((e) => e.time >= doc.now - WINDOW_S).slice(-500);
}

function eventKey(e) {
  return [e.time, e.kind, e.subject, e.from, e.to].join("|");
}

// ---- charts ---------------------------------------------------------------

function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const mag = Math.pow(2, Math.floor(Math.log2(raw)));
  // Powers of two read well for bytes; 1, 2, 5 would for decimals.
  for (const m of [1, 2, 4, 8]) if (mag * m >= raw) return mag * m;
  return mag * 8;
}

const TIME_STEPS = [5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200];

function drawChart(svg, series, opts) {
  const w = Math.max(200, Math.round(svg.clientWidth || 600));
  const h = Math.max(100, Math.round(svg.clientHeight || 220));
  const m = { l: 72, r: 14, t: 10, b: 26 };
  svg.setAttribute("viewBox", "0 0 " + w + " " + h);
  const nodes = [];
  const t0 = opts.t0;
  const t1 = Math.max(opts.t1, t0 + 60);
  let vmax = opts.cap || 0;
  let count = 0;
  let fewest = Infinity;
  for (const s of series) {
    let n = 0;
    s.values.forEach((v, i) => {
      if (v === null || v === undefined || s.times[i] < t0) return;
      n += 1;
      vmax = Math.max(vmax, v);
    });
    count += n;
    fewest = Math.min(fewest, n);
  }
  // For tests and curious operators: the fewest points any line has.
  svg.dataset.points = String(fewest);
  const latest = series.map((x) => x.cls.slice(2) + " " + opts.format(lastValue(x) ?? 0)).join(", ");
  svg.setAttribute("aria-label", opts.label + " from " + fmtClock(t0) + " to " + fmtClock(opts.t1) + "; now " + latest);
  if (!count) {
    const text = svgEl("text", { x: w / 2, y: h / 2, "text-anchor": "middle", class: "empty" });
    text.textContent = "waiting for data";
    svg.replaceChildren(text);
    return;
  }
  if (vmax <= 0) vmax = 1;
  const yStep = niceStep(vmax, 4);
  const yMax = Math.ceil((vmax * 1.02) / yStep) * yStep;
  const x = (t) => m.l + ((t - t0) / (t1 - t0)) * (w - m.l - m.r);
  const y = (v) => h - m.b - (v / yMax) * (h - m.t - m.b);
  for (let v = 0; v <= yMax + yStep / 2; v += yStep) {
    nodes.push(svgEl("line", { x1: m.l, x2: w - m.r, y1: y(v), y2: y(v), class: "grid" }));
    const label = svgEl("text", { x: m.l - 6, y: y(v) + 4, "text-anchor": "end" });
    label.textContent = opts.format(v);
    nodes.push(label);
  }
  const span = t1 - t0;
  const maxTicks = Math.max(2, Math.floor((w - m.l - m.r) / 80));
  const tStep = TIME_STEPS.find((s) => span / s <= maxTicks) || 7200;
  const offset = new Date(t0 * 1000).getTimezoneOffset() * 60;
  for (let t = Math.ceil((t0 - offset) / tStep) * tStep + offset; t <= t1; t += tStep) {
    nodes.push(svgEl("line", { x1: x(t), x2: x(t), y1: h - m.b, y2: h - m.b + 4, class: "axis" }));
    const label = svgEl("text", { x: x(t), y: h - m.b + 16, "text-anchor": "middle" });
    label.textContent = fmtClock(t, tStep < 60);
    nodes.push(label);
  }
  nodes.push(svgEl("line", { x1: m.l, x2: m.l, y1: m.t, y2: h - m.b, class: "axis" }));
  nodes.push(svgEl("line", { x1: m.l, x2: w - m.r, y1: h - m.b, y2: h - m.b, class: "axis" }));
  if (opts.cap) {
    nodes.push(svgEl("line", { x1: m.l, x2: w - m.r, y1: y(opts.cap), y2: y(opts.cap), class: "cap" }));
  }
  for (const s of series) {
    const d = pathData({ ...s, from: t0 }, x, y, opts.gap);
    nodes.push(svgEl("path", { d, class: "line " + s.cls }));
  }
  svg.replaceChildren(...nodes);
}

// An SVG path that breaks at null values and at gaps longer than `gap` s.
function pathData(s, x, y, gap) {
  let d = "";
  let last = null;
  s.values.forEach((v, i) => {
    const t = s.times[i];
    if (v === null || v === undefined || t < (s.from ?? -Infinity)) {
      last = null;
      return;
    }
    const move = last === null || t - last > gap;
    // "h0": a point on its own still shows, as a dot (round line caps).
    d += (move ? "M" : "L") + x(t).toFixed(1) + " " + y(v).toFixed(1) + (move ? "h0" : "");
    last = t;
  });
  return d;
}

function sparkline(series, gap) {
  const w = 120;
  const h = 28;
  const svg = svgEl("svg", { class: "spark", viewBox: "0 0 " + w + " " + h, preserveAspectRatio: "none", role: "img" });
  const pts = series.values.map((v, i) => [series.times[i], v]).filter(([, v]) => v !== null && v !== undefined);
  svg.dataset.points = String(pts.length);
  if (pts.length < 2) {
    svg.setAttribute("aria-label", "no rate data yet");
    return svg;
  }
  const t0 = pts[0][0];
  const t1 = Math.max(pts[pts.length - 1][0], t0 + 1);
  const vmax = Math.max(1, ...pts.map(([, v]) => v));
  const x = (t) => ((t - t0) / (t1 - t0)) * (w - 2) + 1;
  const y = (v) => h - 2 - (v / vmax) * (h - 4);
  const path = svgEl("path", { d: pathData(series, x, y, gap), class: "line" });
  path.setAttribute("vector-effect", "non-scaling-stroke");
  svg.setAttribute("aria-label", "rate over the last " + fmtDuration(t1 - t0) + ", peak " + fmtRate(vmax));
  svg.append(path);
  return svg;
}

// ---- rendering ------------------------------------------------------------

function useHistory() {
  return recorded.state === "ok" && recorded.times.length > 0;
}

// History, then what this tab has polled since history's last point: the
// graphs move every 2 s although history has a point every 10 s.
function withTail(values, tail) {
  const times = recorded.times.slice();
  const out = (values || []).slice();
  while (out.length < times.length) out.push(null);
  const after = times.length ? times[times.length - 1] : -Infinity;
  tail.times.forEach((t, i) => {
    if (t > after) {
      times.push(t);
      out.push(tail.values[i]);
    }
  });
  return { times, values: out };
}

function drawCharts() {
  const s = prev;
  if (!s) return;
  let level = live.level;
  let inRate = live.inRate;
  let outRate = live.outRate;
  let gap = (STATUS_MS / 1000) * 5;
  if (useHistory()) {
    level = withTail(recorded.pool.level_bytes, live.level);
    inRate = withTail(recorded.pool.in_bytes_per_s, live.inRate);
    outRate = withTail(recorded.pool.out_bytes_per_s, live.outRate);
    gap = recorded.step * 2.5;
  }
  // Both graphs share one time axis, ending now.
  const firsts = [level, inRate, outRate].map((x) => x.times[0]).filter(Number.isFinite);
  const range = { t0: Math.min(s.time - 60, ...firsts), t1: s.time };
  drawChart($("chart-level"), [{ ...level, cls: "s-level" }], { format: fmtAxis, cap: s.pool.capacity, gap, label: "pool level", ...range });
  drawChart($("chart-rates"), [{ ...inRate, cls: "s-in" }, { ...outRate, cls: "s-out" }], {
    format: (v) => fmtAxis(v) + "/s",
    cap: null,
    label: "pool input and output",
    gap,
    ...range,
  });
}

function lastValue(series) {
  for (let i = series.values.length - 1; i >= 0; i -= 1) {
    if (series.values[i] !== null && series.values[i] !== undefined) return series.values[i];
  }
  return null;
}

function renderHeader(s) {
  setText("instance", s.instance + " \u00b7 " + s.version);
  const health = $("health");
  setText("health", s.health.status.replace("_", " "));
  health.className = "word " + s.health.status;
  setText("phase", s.phase);
  setText("active-tier", s.tiers.active_tier === null ? "none" : String(s.tiers.active_tier));
  setText("failovers", String(s.tiers.failovers));
  setText("uptime", fmtDuration(s.uptime));
  setText("updated", fmtClock(s.time, true));
  setText("pool-level", fmtBytes(s.pool.level));
  setText("pool-capacity", fmtBytes(s.pool.capacity));
  setText("pool-waiters", String(s.pool.waiters));
  setText("pool-in", fmtRate(lastValue(live.inRate)));
  setText("pool-out", fmtRate(lastValue(live.outRate)));
  const note = {
    loading: "history: loading",
    ok: "history: last hour, " + recorded.step + " s steps",
    absent: "history: not kept by this broker; graphs show what this tab has seen",
    error: "history: unavailable; graphs show what this tab has seen",
  }[recorded.state];
  setText("history-note", note);
}

function renderBanner(s, failure) {
  const items = [];
  let level = "warn";
  if (failure) {
    level = "bad";
    items.push(["unreachable", "the broker did not answer /v1/status (" + failure + ")"]);
  } else {
    const status = s.health.status;
    const reasons = (s.health.reasons || []).join("; ");
    if (["draining", "closing", "stopped"].includes(s.phase) || status === "shutting_down") {
      level = "bad";
      items.push(["shutting down", reasons || "phase " + s.phase]);
    } else if (status === "unhealthy") {
      level = "bad";
      items.push(["unhealthy", reasons || "not serving"]);
    } else if (status === "degraded") {
      items.push(["degraded", reasons || "fed by a fallback tier"]);
    }
    for (const src of s.sources) {
      if (src.state === "failed" || src.state === "quarantined" || src.state === "stalled") {
        items.push([src.state, "source " + src.name + (src.reason ? ": " + src.reason : "")]);
      }
    }
    const backend = s.accounts?.backend;
    if (backend && !backend.healthy) items.push(["unreachable", "accounts backend " + backend.kind]);
  }
  const banner = $("banner");
  const text = items.map(([word, why]) => word + ": " + why).join(" \u2014 ");
  if (banner.dataset.text === text) return;
  banner.dataset.text = text;
  banner.hidden = items.length === 0;
  banner.className = "banner" + (level === "bad" ? " bad" : "");
  banner.replaceChildren(
    ...items.map(([word, why], i) =>
      el("span", { class: "item" }, i ? " \u2014 " : "", el("strong", { class: "word" }, word.toUpperCase()), why),
    ),
  );
}

function healthCounters(src) {
  const h = src.health || {};
  const parts = [
    "RCT " + (h.rct_failures ?? 0),
    "APT " + (h.apt_failures ?? 0),
    "quarantines " + (h.quarantines ?? 0),
    "restarts " + src.restarts,
  ];
  if (h.fips_blocks) parts.push("FIPS " + h.fips_failures + "/" + h.fips_blocks);
  if (h.stalls) parts.push("stalls " + h.stalls);
  if (src.details?.mac_failures) parts.push("MAC " + src.details.mac_failures);
  return parts.join(" \u00b7 ");
}

function keyFacts(src) {
  if (src.kind !== "entropykey") return "";
  const d = src.details || {};
  const temp = d.temperature_c === null || d.temperature_c === undefined ? "\u2014" : d.temperature_c.toFixed(1) + " \u00b0C";
  const volt = d.voltage_v === null || d.voltage_v === undefined ? "\u2014" : d.voltage_v.toFixed(2) + " V";
  return temp + " \u00b7 " + volt;
}

function renderSources(s) {
  const gap = useHistory() ? recorded.step * 2.5 : 10;
  const rows = s.sources.map((src) => {
    const cls = STATE_CLASS[src.state] || "warn";
    const seen = live.sources[src.name] || emptySeries();
    const series = useHistory() ? withTail(recorded.sources[src.name]?.rate_bytes_per_s, seen) : seen;
    const key = keyFacts(src);
    const keyCell = el("td", { "data-label": "key" }, key);
    if (src.details?.serial) keyCell.append(el("div", { class: "small muted" }, src.details.serial));
    return el(
      "tr",
      { "data-source": src.name, "data-state": src.state, "data-tier": String(src.priority), class: "row-" + cls },
      el("th", { scope: "row" }, src.name),
      td(src.kind, null, "kind"),
      td(src.priority, "n", "tier"),
      el(
        "td",
        { "data-label": "state" },
        stateBadge(src.state),
        src.feeding ? el("div", { class: "small muted" }, "feeding") : null,
      ),
      td(src.reason, "small", "reason"),
      td(fmtRate(src.rate), "n", "rate"),
      el("td", { "data-label": "last hour" }, sparkline(series, gap)),
      td(healthCounters(src), "small", "health"),
      keyCell,
    );
  });
  $("sources").tBodies[0].replaceChildren(...rows);
}

function customerSeries(id) {
  const seen = live.customers[id] || emptySeries();
  return useHistory() ? withTail(recorded.customers[id]?.bytes_per_s, seen) : seen;
}

function renderCustomers(s) {
  const gap = useHistory() ? recorded.step * 2.5 : 10;
  const customers = Object.entries(s.accounts?.customers || {});
  const rows = customers.map(([id, c]) => {
    const quota = el("td", { class: "quota" });
    if (c.quota) {
      const q = c.quota;
      const pct = q.limit ? Math.min(100, (100 * q.used) / q.limit) : 0;
      quota.append(fmtBytes(q.used) + " of " + fmtBytes(q.limit) + " per " + q.period + " (" + pct.toFixed(0) + " %)");
      const fill = el("span");
      fill.style.width = pct.toFixed(1) + "%";
      quota.append(
        el(
          "div",
          {
            class: "bar" + (pct >= 100 ? " full" : ""),
            role: "progressbar",
            "aria-valuemin": "0",
            "aria-valuemax": String(q.limit),
            "aria-valuenow": String(q.used),
            "aria-label": "quota used by " + id,
          },
          fill,
        ),
      );
    } else {
      quota.append(c.deny ? "denied" : "no quota");
    }
    const name = el("th", { scope: "row" }, id);
    if (c.implicit) name.append(el("div", { class: "small muted" }, "unmatched clients"));
    return el(
      "tr",
      { "data-customer": id },
      name,
      el("td", { class: "n" }, fmtBytes(c.bytes_served), sparkline(customerSeries(id), gap)),
      quota,
      td(fmtCount(c.throttled_requests) + " req \u00b7 " + (c.throttled_seconds ?? 0).toFixed(1) + " s", "n"),
      td(c.client_count, "n"),
    );
  });
  $("customers").tBodies[0].replaceChildren(...rows);
  const backend = s.accounts?.backend;
  const b = $("backend");
  if (backend) {
    b.textContent = backend.kind + " \u00b7 " + (backend.healthy ? "reachable" : "unreachable");
    b.className = "word " + (backend.healthy ? "ok" : "unhealthy");
  }
}

function renderSinks(s) {
  const rows = s.sinks.map((k) => {
    const addresses = el("td", { class: "small" });
    k.addresses.forEach((a, i) => {
      if (i) addresses.append(el("br"));
      addresses.append(a);
    });
    return el(
      "tr",
      { "data-sink": k.name },
      el("th", { scope: "row" }, k.name),
      td(k.kind),
      addresses,
      td(fmtCount(k.connections) + " (" + fmtCount(k.connections_total) + " total)", "n"),
      td(fmtCount(k.requests), "n"),
      td(fmtBytes(k.bytes_out), "n"),
    );
  });
  $("sinks").tBodies[0].replaceChildren(...rows);
}

const EVENT_WORDS = {
  source_state: "source",
  tier_change: "tier change",
  failover: "failover",
  phase: "phase",
  gap: "gap",
};

function renderEvents() {
  const events = (useHistory() ? recorded.events : derivedEvents).slice(-100).reverse();
  const items = events.map((e) => {
    const change = el("span", {}, e.from || e.to ? (e.from || "?") + " \u2192 " + (e.to || "?") : "");
    if (e.kind === "source_state" && e.to) {
      const cls = STATE_CLASS[e.to];
      change.className = "word " + (cls === "ok" ? "ok" : cls === "bad" ? "unhealthy" : "degraded");
    }
    return el(
      "li",
      { "data-kind": e.kind },
      el("time", { datetime: new Date(e.time * 1000).toISOString() }, fmtClock(e.time, true)),
      el("span", { class: "kind" }, EVENT_WORDS[e.kind] || e.kind),
      el("span", {}, e.subject || ""),
      change,
      e.reason ? el("span", { class: "muted" }, e.reason) : null,
    );
  });
  $("events").replaceChildren(...items);
  $("events-empty").hidden = items.length > 0;
}

function render(failure) {
  if (prev) {
    renderHeader(prev);
    renderSources(prev);
    renderCustomers(prev);
    renderSinks(prev);
    renderEvents();
    drawCharts();
  }
  renderBanner(prev, failure);
  if (failure) {
    setText("health", "unreachable");
    $("health").className = "word unreachable";
  }
}

// ---- polling --------------------------------------------------------------

async function getJson(url) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
  try {
    const response = await fetch(url, { cache: "no-store", signal: controller.signal, headers: { Accept: "application/json" } });
    return { status: response.status, body: response.ok ? await response.json() : null };
  } finally {
    clearTimeout(timer);
  }
}

async function pollHistory() {
  const now = Date.now();
  if (now < recorded.nextFetch) return;
  recorded.nextFetch = now + Math.max(STATUS_MS, recorded.step * 1000);
  try {
    const { status, body } = await getJson(historyUrl());
    if (status === 404) {
      recorded.state = "absent";
      recorded.nextFetch = now + HISTORY_RETRY_MS;
    } else if (body) {
      mergeHistory(body);
      recorded.state = "ok";
    } else {
      recorded.state = recorded.times.length ? "ok" : "error";
    }
  } catch (err) {
    recorded.state = recorded.times.length ? "ok" : "error";
  }
}

async function tick() {
  let failure = null;
  try {
    const { status, body } = await getJson("/v1/status");
    if (!body) throw new Error("HTTP " + status);
    observe(body);
  } catch (err) {
    failure = err.name === "AbortError" ? "timed out" : err.message;
  }
  if (!failure) await pollHistory();
  render(failure);
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  setTimeout(tick, document.hidden ? HIDDEN_MS : STATUS_MS);
}

let resizePending = false;
window.addEventListener("resize", () => {
  if (resizePending) return;
  resizePending = true;
  requestAnimationFrame(() => {
    resizePending = false;
    drawCharts();
  });
});

tick();
