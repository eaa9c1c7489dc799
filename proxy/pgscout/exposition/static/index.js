// pgscout status page: polls the JSON API every 2 s and draws what it returns.
// Rates and latencies are computed here from successive cumulative readings: first the last
// 15 minutes pgscout sampled itself (/api/history), then each /api/overview poll. Everything from
// the API is inserted as text, never as HTML: SQL and application names come from clients.
"use strict";

const POLL_MS = 2000;
const HISTORY_SECONDS = 900;
const TOKEN_KEY = "pgscout.adminToken";
const SHOWN = { fingerprints: 15, findings: 10, slow: 15 };

const history = [];  // {t, rate, mean, p95} per poll interval
let previousOverview = null;
let historyLoaded = false;

class TokenNeeded extends Error {}

// -- fetching ----------------------------------------------------------------------------------

async function api(path, method = "GET") {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch(path, { method, headers, cache: "no-store" });
  if (response.status === 401) throw new TokenNeeded();
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

async function poll() {
  try {
    if (!historyLoaded) {
      for (const sample of (await api("/api/history")).samples) record(sample);
      historyLoaded = true;
    }
    const [overview, fingerprints, findings, slow, connections] = await Promise.all([
      api("/api/overview"),
      api(`/api/fingerprints?sort=total_time&limit=${SHOWN.fingerprints}`),
      api("/api/findings"),
      api("/api/slow"),
      api("/api/connections"),
    ]);
    document.getElementById("token-form").hidden = true;
    record(overview);
    renderState(overview);
    renderTiles(overview);
    renderCharts(overview.now);
    renderFindings(findings.findings);
    renderFingerprints(fingerprints.fingerprints, fingerprints.stats_reset);
    renderSlow(slow.slow_queries);
    renderConnections(connections);
  } catch (error) {
    if (error instanceof TokenNeeded) {
      askForToken();
    } else {
      setState("down", "unreachable");
    }
  }
}

function askForToken() {
  const form = document.getElementById("token-form");
  const hadToken = sessionStorage.getItem(TOKEN_KEY) !== null;
  document.getElementById("token-error").textContent = hadToken ? "That token was refused." : "";
  if (form.hidden) {
    form.hidden = false;
    document.getElementById("token").focus();
  }
  setState("stale", "needs token");
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
  poll();
});

document.getElementById("reset").addEventListener("click", async () => {
  try {
    await api("/api/reset", "POST");
  } catch (error) {
    if (error instanceof TokenNeeded) askForToken();
    return;
  }
  poll();
});

// -- history for the charts ------------------------------------------------------------------

function record(overview) {
  const before = previousOverview;
  previousOverview = overview;
  if (!before || overview.statements < before.statements) return;  // first poll, or a restart
  const seconds = overview.now - before.now;
  if (seconds <= 0) return;
  const calls = overview.statements - before.statements;
  history.push({
    t: overview.now,
    rate: calls / seconds,
    mean: calls ? (overview.statement_seconds - before.statement_seconds) / calls * 1000 : null,
    p95: calls ? percentileMs(before.latency_buckets, overview.latency_buckets, 0.95) : null,
  });
  while (history.length && history[0].t < overview.now - HISTORY_SECONDS) history.shift();
}

// The upper bound of the bucket holding the quantile of the statements done between two polls.
function percentileMs(before, after, quantile) {
  const total = after[after.length - 1][1] - before[before.length - 1][1];
  let previousBound = 0;
  for (let i = 0; i < after.length; i++) {
    const [bound, count] = after[i];
    if (count - before[i][1] >= quantile * total) {
      return (bound === "+Inf" ? previousBound : bound) * 1000;
    }
    previousBound = bound;
  }
  return null;
}

// -- rendering helpers -----------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svgEl(tag, attributes = {}, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function ms(value) {
  if (value === null || value === undefined) return "–";
  if (value >= 10000) return (value / 1000).toFixed(1) + " s";
  if (value >= 100) return value.toFixed(0) + " ms";
  return value.toFixed(value >= 10 ? 1 : 2) + " ms";
}

function count(value) {
  return Number(value).toLocaleString("en-US");
}

function clock(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleTimeString([], { hour12: false });
}

function duration(seconds) {
  const s = Math.floor(seconds);
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.floor(s / 60)} min`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function replaceRows(tableId, rows, emptyText, columns) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: columns, class: "empty" }, emptyText))]));
}

function sqlCell(text) {
  return el("td", { class: "sql", title: text || "" }, el("code", {}, text || "?"));
}

function level(usage) {
  return usage >= 0.95 ? "critical" : usage >= 0.8 ? "warning" : "";
}

function meter(what, current, max, detail) {
  const usage = max ? current / max : 0;
  const bar = el("div", { class: `bar ${level(usage)}` },
    el("span", { style: `width: ${Math.min(100, usage * 100).toFixed(1)}%` }));
  return el("div", { class: "meter" }, el("span", { class: "what" }, what), bar,
    el("span", { class: "num" }, detail));
}

// -- sections --------------------------------------------------------------------------------

function setState(kind, text) {
  const state = document.getElementById("state");
  state.className = `pill ${kind}`;
  state.textContent = text;
}

function renderState(overview) {
  setState(overview.draining ? "draining" : "live", overview.draining ? "draining" : "live");
  document.getElementById("uptime").textContent =
    `up ${duration(overview.now - overview.started_at)} · updated ${clock(overview.now)}`;
}

function renderTiles(overview) {
  const latest = history[history.length - 1];
  const tiles = [
    ["statements / s", latest ? latest.rate.toFixed(1) : "–"],
    ["mean latency", latest ? ms(latest.mean) : "–"],
    ["statements", count(overview.statements)],
    ["open sessions", count(overview.open_sessions)],
    ["slow statements", count(overview.slow_total), overview.slow_total > 0],
    ["findings", count(overview.findings_total), overview.findings_total > 0],
    ["errors", count(overview.errors), overview.errors > 0],
    ["decoder desyncs", count(overview.desyncs), overview.desyncs > 0],
    ["not analysed (shed)", count(overview.analysis_records_shed), overview.analysis_records_shed > 0],
  ];
  document.getElementById("tiles").replaceChildren(...tiles.map(([label, value, alert]) =>
    el("div", { class: alert ? "tile alert" : "tile" },
      el("div", { class: "value" }, value), el("div", { class: "label" }, label))));
}

function renderCharts(now) {
  drawChart("rate-chart", now, [{ key: "rate", class: "rate" }], (v) => v.toFixed(v >= 10 ? 0 : 1) + "/s");
  drawChart("latency-chart", now, [{ key: "mean", class: "mean" }, { key: "p95", class: "p95" }], ms);
}

function drawChart(id, now, series, format) {
  const svg = document.getElementById(id);
  const width = 600, height = 170, left = 56, right = 8, top = 8, bottom = 20;
  const plotWidth = width - left - right, plotHeight = height - top - bottom;
  const values = history.flatMap((point) => series.map((s) => point[s.key]))
    .filter((v) => v !== null);
  const max = Math.max(...values, 0) * 1.1 || 1;
  const x = (t) => left + (1 - (now - t) / HISTORY_SECONDS) * plotWidth;
  const y = (v) => top + plotHeight * (1 - v / max);
  const nodes = [];
  for (const fraction of [0, 0.5, 1]) {
    const value = max * fraction;
    nodes.push(svgEl("line", { class: "grid", x1: left, x2: width - right, y1: y(value), y2: y(value) }));
    nodes.push(svgEl("text", { x: left - 6, y: y(value) + 4, "text-anchor": "end" }, format(value)));
  }
  for (const minutesAgo of [15, 10, 5, 0]) {
    nodes.push(svgEl("text", { x: x(now - minutesAgo * 60), y: height - 4, "text-anchor": "middle" },
      minutesAgo ? `-${minutesAgo} min` : "now"));
  }
  for (const s of series) {
    const points = history.filter((point) => point[s.key] !== null)
      .map((point) => `${x(point.t).toFixed(1)},${y(point[s.key]).toFixed(1)}`);
    if (points.length) nodes.push(svgEl("polyline", { class: s.class, points: points.join(" ") }));
  }
  if (history.length < 2) {
    nodes.push(svgEl("text", { x: left + plotWidth / 2, y: top + plotHeight / 2, "text-anchor": "middle" },
      "collecting…"));
  }
  svg.replaceChildren(...nodes);
}

const FINDING_TITLES = {
  blocking_migration: "Blocking migration", no_statement_timeout: "No statement timeout",
  long_transaction: "Long transaction", idle_in_transaction: "Idle in transaction",
  missing_index: "Missing index", n_plus_one: "N+1 loop", duplicate: "Duplicate query",
  connection_churn: "Connection churn",
};

// What each kind's evidence says in a line, and the SQL lines shown under it.
function findingSummary(f) {
  const e = f.evidence;
  switch (f.kind) {
    case "n_plus_one":
    case "duplicate": {
      // A roll-up: N is per loop, the loops are counted apart.
      const repeated = e.loops > 1 ? ` per loop · ${e.loops} loops (largest ${e.n_max})` : "";
      const spread = e.connections > 1 ? ` over ${e.connections} connections` : "";
      const cost = f.kind === "n_plus_one"
        ? `loop ${ms(e.loop_time_ms)}, ${ms(e.waste_ms)} beyond one query`
        : `${ms(e.waste_ms)} spent on repeats`;
      return [`N = ${e.n}${repeated}${spread}`, `${cost} · ${e.confidence} confidence`,
        [["owner", e.owner_sql || "(none seen)"], ["child", e.child_sql]]];
    }
    case "blocking_migration":
      return [`${e.table}: lock held ${ms(e.lock_held_ms)}`,
        `${e.waiting_sessions} session(s) waited ${ms(e.waited_total_ms)} in all`,
        [["DDL", e.statement], ...e.waiters.map((w) =>
          [`waited ${ms(w.delay_ms)}`, `${w.statement}  (${w.application_name || "?"})`])]];
    case "no_statement_timeout":
      return [`slowest ${ms(e.slowest_ms)}`,
        `${e.backend_seconds_held.toFixed(1)} s of backend time in statements over ${ms(e.threshold_ms)} · ${e.sessions} session(s)`,
        [["slowest", e.slowest_statement]]];
    case "long_transaction":
    case "idle_in_transaction": {
      const what = f.kind === "idle_in_transaction" ? `idle ${e.idle_seconds.toFixed(1)} s, ` : "";
      const wrote = e.wrote ? "wrote rows" : e.locked_rows ? "locked rows" : "read only";
      return [`${what}open ${e.open_seconds.toFixed(1)} s`, `${wrote} · backend ${e.backend_pid}`,
        e.statements.map((s) => [s.count > 1 ? `×${s.count}` : "ran", s.statement])];
    }
    case "missing_index":
      return [`${e.table} (${e.column}), about ${count(e.rows_estimate)} rows`,
        `behind ${e.source === "n_plus_one" ? "an N+1 child query" : "a slow statement"} of ${ms(e.duration_ms)}`,
        [["query", e.statement], ...e.existing_indexes.map((index) => ["index", index])]];
    case "connection_churn":
      return [`${e.opens_per_second.toFixed(1)} connections opened per second`,
        `median lifetime ${e.median_lifetime_seconds === null ? "?" : ms(e.median_lifetime_seconds * 1000)}`, []];
    default:
      return ["", "", []];
  }
}

function renderFindings(findings) {
  const container = document.getElementById("findings");
  if (!findings.length) {
    container.replaceChildren(el("p", { class: "empty" }, "No finding yet."));
    return;
  }
  container.replaceChildren(...findings.slice(0, SHOWN.findings).map((f) => {
    const [title, detail, lines] = findingSummary(f);
    const who = f.application;
    const seen = f.occurrences > 1 ? `${count(f.occurrences)} times, last ${clock(f.last_seen)}` : clock(f.first_seen);
    return el("div", { class: `finding ${f.severity}` },
      el("div", { class: "head" },
        el("span", { class: `badge ${f.severity}` }, f.severity),
        el("span", { class: "title" }, `${FINDING_TITLES[f.kind] || f.kind}: ${title}`),
        el("span", {}, `application ${who.application_name || "?"}${who.user ? ` · ${who.user}@${who.database}` : ""}${who.route ? ` · ${who.route}` : ""}`),
        el("span", { class: "muted" }, `${detail} · ${seen}`)),
      ...lines.map(([label, sql]) => el("div", { class: "sqlline" }, el("b", {}, label), el("code", {}, sql))),
      el("div", { class: "suggestion" }, el("strong", {}, "Fix: "), f.suggestion));
  }));
}

function renderFingerprints(fingerprints, statsReset) {
  document.getElementById("stats-reset").textContent = statsReset ? `since ${clock(statsReset)}` : "";
  replaceRows("fingerprints", fingerprints.map((f) => el("tr", {},
    sqlCell(f.normalized),
    el("td", { class: "num" }, count(f.calls)),
    el("td", { class: "num" }, ms(f.total_seconds * 1000)),
    el("td", { class: "num" }, ms(f.mean_seconds * 1000)),
    el("td", { class: "num" }, ms(f.max_seconds * 1000)),
    el("td", { class: "num" }, count(f.rows)),
    el("td", { class: "num" }, count(Object.values(f.errors).reduce((a, b) => a + b, 0))),
    el("td", {}, f.applications.join(", ")))), "No statements yet.", 8);
}

function renderSlow(slowQueries) {
  replaceRows("slow", slowQueries.slice(0, SHOWN.slow).map((q) => el("tr", {},
    el("td", { class: "num" }, clock(q.at)),
    el("td", { class: "num" }, ms(q.duration_ms)),
    el("td", {}, q.application_name || "?"),
    sqlCell(q.normalized))), "No slow statement yet.", 4);
}

function renderConnections(connections) {
  const upstream = connections.upstream;
  const upstreamBox = document.getElementById("upstream");
  if (upstream.max_connections === null) {
    upstreamBox.replaceChildren(el("p", { class: "empty" },
      upstream.last_error ? `Upstream limits unknown: ${upstream.last_error}` : "Reading the upstream's limits…"));
  } else {
    const used = upstream.client_backends;
    const available = upstream.available_connections;
    upstreamBox.replaceChildren(
      el("h3", {}, `Upstream headroom (PostgreSQL ${upstream.server_version})`),
      meter("client backends", used, available,
        `${used} of ${available} · ${available - used} free (max_connections ${upstream.max_connections})`));
  }

  const budgets = connections.budgets;
  document.getElementById("budgets").replaceChildren(...(budgets.length ? budgets.map((b) => {
    const match = ["application_name", "user", "database"].filter((k) => b[k] !== null)
      .map((k) => `${k}=${b[k]}`).join(" ") || "all sessions";
    const refused = b.refused_total ? ` · ${b.refused_total} refused` : "";
    return meter(`${b.name} (${match})`, b.current, b.max_connections,
      el("span", {}, `${b.current} of ${b.max_connections}${b.enforce ? " (enforced)" : ""}${refused}`,
        b.over_budget ? el("strong", { class: "error over-budget" }, " · over budget") : null));
  }) : [el("p", { class: "empty" }, "No budgets configured.")]));

  const byApplication = new Map();
  for (const row of connections.live) {
    const name = row.application || "(none)";
    const counts = byApplication.get(name) || { active: 0, idle: 0, inTransaction: 0, other: 0 };
    // pg_stat_activity's spellings: "idle in transaction" and "idle in transaction (aborted)".
    const state = row.state.startsWith("idle in transaction") ? "inTransaction"
      : row.state in counts ? row.state : "other";
    counts[state] += row.count;
    byApplication.set(name, counts);
  }
  replaceRows("applications", [...byApplication.entries()].map(([name, c]) => el("tr", {},
    el("td", {}, name),
    el("td", { class: "num" }, c.active),
    el("td", { class: "num" }, c.idle),
    el("td", { class: "num" }, c.inTransaction),
    el("td", { class: "num" }, c.other),
    el("td", { class: "num" }, c.active + c.idle + c.inTransaction + c.other))),
  "No open connections.", 6);

  document.getElementById("churn").replaceChildren(...connections.churn.map((c) =>
    el("p", { class: "error" },
      `${c.application_name}: ${c.opens_per_second.toFixed(1)} connections/s opened — ${c.hint}`)));
}

poll();
setInterval(poll, POLL_MS);
