// edgeproxy admin page: reads only the admin API (relative to this page), renders with the DOM.
// Logged prompts are written by whoever calls the gateway, so no data ever goes through innerHTML:
// every value lands in textContent or an attribute.
"use strict";

const KEY_STORAGE = "edgeproxy.adminKey";
const PAGE_SIZE = 50;
const CHART_GROUPS = 6;
const COLORS = ["#3b5bdb", "#e8590c", "#2f9e44", "#ae3ec9", "#1098ad", "#f08c00", "#868e96"];
const RANGES = { "1h": [3600, 60], "24h": [86400, 1800], "7d": [604800, 21600], "30d": [2592000, 86400] };
const SVG_NS = "http://www.w3.org/2000/svg";

const state = { cursor: null, filters: {}, selected: null };

// --- DOM helpers ------------------------------------------------------------------------------

function $(selector) {
  return document.querySelector(selector);
}

function el(tag, options = {}, children = []) {
  const node = document.createElement(tag);
  if (options.className) node.className = options.className;
  if (options.text !== undefined) node.textContent = String(options.text);
  if (options.title) node.title = options.title;
  for (const [name, value] of Object.entries(options.attrs || {})) node.setAttribute(name, value);
  for (const child of children) if (child) node.append(child);
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function showBanner(message) {
  const banner = $("#banner");
  banner.textContent = message;
  banner.hidden = !message;
}

// --- formatting ---------------------------------------------------------------------------------

function fmtTime(iso) {
  const date = new Date(iso);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
}

function fmtUsd(value) {
  if (value === null || value === undefined) return "–";
  if (value === 0) return "$0";
  if (value < 1e-6) return `$${value.toExponential(1)}`;
  // Three significant digits for fractions of a cent, without trailing zeros.
  return value < 0.01 ? `$${Number(value.toPrecision(3))}` : `$${value.toFixed(value < 10 ? 4 : 2)}`;
}

function fmtMs(value) {
  if (value === null || value === undefined) return "–";
  return value < 1000 ? `${value.toFixed(value < 10 ? 2 : 0)} ms` : `${(value / 1000).toFixed(2)} s`;
}

function fmtRate(value) {
  return value === null || value === undefined ? "–" : `${(value * 100).toFixed(1)}%`;
}

function fmtCount(value) {
  return value === null || value === undefined ? "–" : Number(value).toLocaleString("en-US");
}

function fmtTokens(row) {
  if (row.prompt_tokens === null && row.completion_tokens === null) return "–";
  return `${row.prompt_tokens ?? 0} / ${row.completion_tokens ?? 0}`;
}

function statusBadge(status) {
  return el("span", { className: `badge s${Math.floor(status / 100)}`, text: status });
}

function keyCell(value) {
  return value ? document.createTextNode(value) : el("span", { className: "key-none", text: "(none)" });
}

// --- the admin API ------------------------------------------------------------------------------

class Unauthorized extends Error {}

async function api(resource, params = {}) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined));
  const headers = {};
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  const search = query.toString();
  const response = await fetch(`v1/${resource}${search ? "?" + search : ""}`, { headers });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (response.status === 401) throw new Unauthorized(body?.error?.message || "admin key required");
  if (!response.ok) throw new Error(body?.error?.message || `HTTP ${response.status}`);
  return body;
}

// Runs `task`; asks for the admin key (then runs it again) when the API says 401.
async function withKey(task) {
  try {
    showBanner("");
    return await task();
  } catch (error) {
    if (error instanceof Unauthorized) {
      await askForKey(sessionStorage.getItem(KEY_STORAGE) ? "That key was refused." : "");
      return withKey(task);
    }
    showBanner(error.message);
    return null;
  }
}

// One prompt at a time: loads that hit 401 together all wait for the same answer.
let keyPrompt = null;

function askForKey(message) {
  if (keyPrompt) return keyPrompt;
  const dialog = $("#login");
  const input = $("#login-key");
  const error = $("#login-error");
  error.textContent = message;
  error.hidden = !message;
  input.value = "";
  keyPrompt = new Promise((resolve) => {
    $("#login-form").onsubmit = (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY_STORAGE, input.value.trim());
      $("#sign-out").hidden = false;
      dialog.close();
      keyPrompt = null;
      resolve();
    };
    if (!dialog.open) dialog.showModal();
    input.focus();
  });
  return keyPrompt;
}

// --- requests view ------------------------------------------------------------------------------

function readFilters() {
  const form = $("#filters");
  const filters = {};
  for (const name of ["user", "app", "model", "status", "outcome", "property"]) {
    const value = form.elements[name].value.trim();
    if (value) filters[name] = value;
  }
  for (const name of ["from", "to"]) {
    const value = form.elements[name].value;
    if (value) filters[name] = String(new Date(value).getTime());
  }
  return filters;
}

async function loadRequests(reset) {
  if (reset) {
    state.cursor = null;
    state.filters = readFilters();
  }
  const params = { ...state.filters, limit: PAGE_SIZE };
  if (state.cursor) params.cursor = state.cursor;
  const page = await withKey(() => api("requests", params));
  if (!page) return;
  const body = $("#requests-table tbody");
  if (reset) body.replaceChildren();
  for (const row of page.data) body.append(requestRow(row));
  if (!body.children.length) {
    body.append(el("tr", {}, [el("td", { className: "empty", text: "No requests match.", attrs: { colspan: "10" } })]));
  }
  state.cursor = page.next_cursor;
  $("#load-more").hidden = !page.has_more;
  const shown = body.querySelectorAll("tr[data-id]").length;
  $("#requests-summary").textContent = `${shown} request${shown === 1 ? "" : "s"} shown, newest first` +
    (page.has_more ? " (more available)" : "");
}

function requestRow(row) {
  const tr = el("tr", { attrs: { "data-id": row.request_id, tabindex: "0" } }, [
    el("td", { text: fmtTime(row.started_at), title: row.started_at }),
    el("td", {}, [keyCell(row.user_id)]),
    el("td", {}, [keyCell(row.app_id)]),
    el("td", { text: row.model || "–" }),
    el("td", {}, [statusBadge(row.status)]),
    el("td", { text: row.outcome }),
    el("td", { className: "num", text: fmtMs(row.latency_ms) }),
    el("td", { className: "num", text: fmtTokens(row) }),
    el("td", { className: "num", text: fmtUsd(row.cost_usd) }),
    el("td", {}, [row.cache ? el("span", { className: `tag ${row.cache === "HIT" ? "hit" : ""}`, text: row.cache }) : null]),
  ]);
  const open = () => openDetail(row.request_id, tr);
  tr.addEventListener("click", open);
  tr.addEventListener("keydown", (event) => {
    if (event.key === "Enter") open();
  });
  return tr;
}

// --- detail drawer ------------------------------------------------------------------------------

async function openDetail(id, rowNode) {
  const record = await withKey(() => api(`requests/${encodeURIComponent(id)}`));
  if (!record) return;
  if (state.selected) state.selected.classList.remove("selected");
  state.selected = rowNode || null;
  if (rowNode) rowNode.classList.add("selected");
  $("#detail-title").replaceChildren(document.createTextNode("Request "), statusBadge(record.status));
  $("#detail-body").replaceChildren(...detailSections(record));
  $("#detail").hidden = false;
}

function facts(pairs) {
  const list = el("dl", { className: "facts" });
  for (const [label, value] of pairs) {
    if (value === null || value === undefined || value === "") continue;
    list.append(el("dt", { text: label }), el("dd", { text: value }));
  }
  return list;
}

function section(title, ...children) {
  return el("section", { className: "detail-section" }, [el("h3", { text: title }), ...children]);
}

function detailSections(r) {
  const overview = facts([
    ["Request id", r.request_id],
    ["Time", `${fmtTime(r.started_at)} (${r.started_at})`],
    ["Endpoint", `${r.method} ${r.path}`],
    ["Model", r.model],
    ["Target", r.target],
    ["Answered by", r.answered_by],
    ["Outcome", r.outcome],
    ["Error", r.error],
    ["User", r.user_id],
    ["App", r.app_id],
    ["Key id", r.key_id],
    ["Cache", r.cache],
    ["Attempts", r.attempts],
  ]);
  const numbers = facts([
    ["Tokens", `${fmtCount(r.prompt_tokens)} prompt + ${fmtCount(r.completion_tokens)} completion = ${fmtCount(r.total_tokens)}`],
    ["Cost", fmtUsd(r.cost_usd)],
    ["Saved by cache", r.cost_saved_usd ? fmtUsd(r.cost_saved_usd) : null],
    ["Latency", fmtMs(r.latency_ms)],
    ["Time to first byte", fmtMs(r.ttfb_ms)],
    ["Upstream", fmtMs(r.upstream_ms)],
    ["Gateway overhead", fmtMs(r.gateway_ms)],
  ]);
  // The log keeps what the Helicone-* headers said, never Authorization or provider keys.
  const headerPairs = [
    ["Helicone-User-Id", r.user_id],
    ["Helicone-Session-Id", r.session_id],
    ["Helicone-Session-Path", r.session_path],
    ["Helicone-Session-Name", r.session_name],
    ...Object.entries(r.properties || {}).map(([name, value]) => [`Helicone-Property-${name}`, value]),
  ];
  return [
    section("Overview", overview),
    section("Tokens, cost and timing", numbers),
    section("Request headers (logged, without secrets)", facts(headerPairs)),
    section("Prompt", ...promptNodes(r.request_body, r.request_truncated)),
    section("Response", ...responseNodes(r.response_body, r.response_truncated)),
    section("Parameters", el("pre", { className: "raw", text: JSON.stringify(r.params ?? {}, null, 2) })),
  ];
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch (_) {
    return undefined;
  }
}

function contentText(content) {
  if (typeof content === "string") return content;
  if (Array.isArray(content)) {
    return content.map((part) => (typeof part === "string" ? part : part?.text ?? `[${part?.type ?? "part"}]`)).join("\n");
  }
  return content === null || content === undefined ? "" : JSON.stringify(content, null, 2);
}

function message(role, text) {
  return el("div", { className: "message" }, [
    el("div", { className: "role", text: role }),
    el("div", { className: "content", text }),
  ]);
}

function rawBlock(text, truncated) {
  const pretty = parseJson(text);
  const shown = pretty === undefined ? text : JSON.stringify(pretty, null, 2);
  return el("details", {}, [
    el("summary", { text: truncated ? "Raw body (truncated)" : "Raw body" }),
    el("pre", { className: "raw", text: shown }),
  ]);
}

function promptNodes(body, truncated) {
  if (body === null || body === undefined) return [el("p", { className: "muted", text: "Not logged." })];
  const doc = parseJson(body);
  const nodes = [];
  if (doc && Array.isArray(doc.messages)) {
    if (doc.system) nodes.push(message("system", contentText(doc.system)));
    for (const m of doc.messages) nodes.push(message(m.role || "message", contentText(m.content)));
  } else if (doc && (doc.prompt !== undefined || doc.input !== undefined)) {
    nodes.push(message("prompt", contentText(doc.prompt ?? doc.input)));
  }
  nodes.push(rawBlock(body, truncated));
  return nodes;
}

function responseNodes(body, truncated) {
  if (body === null || body === undefined) return [el("p", { className: "muted", text: "Not logged." })];
  const doc = parseJson(body);
  const nodes = [];
  if (doc?.error) {
    nodes.push(message("error", contentText(doc.error.message ?? doc.error)));
  }
  for (const choice of doc?.choices || []) {
    const text = choice.message ? contentText(choice.message.content) : contentText(choice.text);
    nodes.push(message(choice.message?.role || "completion", text));
  }
  if (Array.isArray(doc?.content)) nodes.push(message(doc.role || "assistant", contentText(doc.content)));
  nodes.push(rawBlock(body, truncated));
  return nodes;
}

// --- usage view ---------------------------------------------------------------------------------

function usageGroupBy() {
  const group = $("#usage-group").value;
  if (group !== "property") return group;
  const name = $("#usage-property").value.trim();
  return name ? `property:${name}` : null;
}

async function loadUsage() {
  const groupBy = usageGroupBy();
  if (!groupBy) {
    showBanner("Name the property to group by.");
    return;
  }
  const [range, interval] = RANGES[$("#usage-range").value];
  const to = Date.now();
  const data = await withKey(() => api("usage", { group_by: groupBy, from: to - range * 1000, to, interval: `${interval}s` }));
  if (!data) return;
  renderCards(data.totals);
  renderUsageTable(data);
  renderChart(data, $("#usage-metric").value);
}

function renderCards(t) {
  const cards = [
    ["Requests", fmtCount(t.requests)],
    ["Cost", fmtUsd(t.cost_usd)],
    ["Tokens", fmtCount(t.prompt_tokens + t.completion_tokens)],
    ["Error rate", fmtRate(t.error_rate)],
    ["Cache hit rate", fmtRate(t.cache_hit_rate)],
    ["p95 latency", fmtMs(t.p95_latency_ms)],
  ];
  $("#usage-cards").replaceChildren(
    ...cards.map(([label, value]) =>
      el("div", { className: "card" }, [el("div", { className: "label", text: label }), el("div", { className: "value", text: value })]),
    ),
  );
}

function renderUsageTable(data) {
  const label = data.group_by.startsWith("property:") ? data.group_by : data.group_by[0].toUpperCase() + data.group_by.slice(1);
  $("#usage-key-header").textContent = label;
  const body = $("#usage-table tbody");
  body.replaceChildren(
    ...data.groups.map((g) =>
      el("tr", {}, [
        el("td", {}, [keyCell(g.key)]),
        el("td", { className: "num", text: fmtCount(g.requests) }),
        el("td", { className: "num", text: fmtCount(g.prompt_tokens) }),
        el("td", { className: "num", text: fmtCount(g.completion_tokens) }),
        el("td", { className: "num", text: fmtUsd(g.cost_usd) }),
        el("td", { className: "num", text: fmtRate(g.error_rate) }),
        el("td", { className: "num", text: fmtRate(g.cache_hit_rate) }),
        el("td", { className: "num", text: fmtMs(g.p50_latency_ms) }),
        el("td", { className: "num", text: fmtMs(g.p95_latency_ms) }),
      ]),
    ),
  );
  if (!data.groups.length) {
    body.append(el("tr", {}, [el("td", { className: "empty", text: "No requests in this range.", attrs: { colspan: "9" } })]));
  }
}

function metricOf(point, metric) {
  return metric === "tokens" ? point.prompt_tokens + point.completion_tokens : point[metric];
}

// A line per top group over every bucket of the range (buckets without requests count 0).
function renderChart(data, metric) {
  const step = data.interval_seconds * 1000;
  const first = Math.floor(Date.parse(data.from) / step) * step;
  const last = Math.floor(Date.parse(data.to) / step) * step;
  const times = [];
  for (let t = first; t <= last; t += step) times.push(t);
  const keys = data.groups.slice(0, CHART_GROUPS).map((g) => g.key);
  const values = new Map(keys.map((k) => [k, new Array(times.length).fill(0)]));
  for (const point of data.series || []) {
    const index = Math.round((Date.parse(point.time) - first) / step);
    if (values.has(point.key) && index >= 0 && index < times.length) values.get(point.key)[index] = metricOf(point, metric);
  }
  const names = { cost_usd: "Cost (USD)", requests: "Requests", tokens: "Tokens", errors: "Errors" };
  $("#chart-title").textContent = `${names[metric]} per ${fmtInterval(data.interval_seconds)}, by ${data.group_by}`;
  $("#usage-chart").replaceChildren(chartSvg(times, keys, values, metric));
  $("#chart-legend").replaceChildren(
    ...keys.map((key, i) =>
      el("span", {}, [el("span", { className: "swatch", attrs: { "data-color": COLORS[i % COLORS.length] } }), keyCell(key)]),
    ),
  );
  // The swatch colour is set through the CSSOM: the page's CSP forbids inline style attributes.
  document.querySelectorAll("#chart-legend .swatch").forEach((node) => (node.style.background = node.dataset.color));
}

function fmtInterval(seconds) {
  if (seconds % 86400 === 0) return `${seconds / 86400} d`;
  if (seconds % 3600 === 0) return `${seconds / 3600} h`;
  if (seconds % 60 === 0) return `${seconds / 60} min`;
  return `${seconds} s`;
}

// The axis top: four equal steps, each 1, 2, 2.5 or 5 times a power of ten.
function niceMax(value) {
  if (value <= 0) return 1;
  const rough = value / 4;
  const power = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 2.5, 5, 10].find((m) => m * power >= rough - 1e-12 * power);
  return 4 * step * power;
}

function fmtAxis(value, metric) {
  if (metric === "cost_usd") return value === 0 ? "$0" : `$${Number(value.toPrecision(2))}`;
  return Number.isInteger(value) ? fmtCount(value) : String(Number(value.toPrecision(3)));
}

function chartSvg(times, keys, values, metric) {
  const W = 960, H = 280, left = 84, right = 16, top = 12, bottom = 28;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "usage over time" });
  const peak = niceMax(Math.max(0, ...[...values.values()].flat()));
  // Counts step by whole numbers at least.
  const max = metric === "cost_usd" ? peak : Math.max(4, peak);
  const x = (i) => left + (times.length < 2 ? 0 : (i * (W - left - right)) / (times.length - 1));
  const y = (v) => top + (H - top - bottom) * (1 - v / max);
  for (let i = 0; i <= 4; i++) {
    const value = (max * i) / 4;
    root.append(svg("line", { x1: left, x2: W - right, y1: y(value), y2: y(value), class: "chart-grid" }));
    root.append(svg("text", { x: left - 8, y: y(value) + 4, "text-anchor": "end", class: "chart-label" }, fmtAxis(value, metric)));
  }
  root.append(svg("line", { x1: left, x2: W - right, y1: y(0), y2: y(0), class: "chart-axis" }));
  const ticks = Math.min(6, times.length);
  for (let j = 0; j < ticks; j++) {
    const i = ticks < 2 ? 0 : Math.round((j * (times.length - 1)) / (ticks - 1));
    const date = new Date(times[i]);
    const label = times[times.length - 1] - times[0] > 86400000
      ? `${date.getMonth() + 1}/${date.getDate()} ${String(date.getHours()).padStart(2, "0")}h`
      : `${String(date.getHours()).padStart(2, "0")}:${String(date.getMinutes()).padStart(2, "0")}`;
    root.append(svg("text", { x: x(i), y: H - 8, "text-anchor": "middle", class: "chart-label" }, label));
  }
  keys.forEach((key, k) => {
    const color = COLORS[k % COLORS.length];
    const series = values.get(key);
    const points = series.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    root.append(svg("polyline", { points, class: "chart-line", stroke: color, "data-key": key }));
    series.forEach((v, i) => {
      if (v <= 0) return;
      const dot = svg("circle", { cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 3, fill: color });
      dot.append(svg("title", {}, `${key || "(none)"} · ${new Date(times[i]).toLocaleString()} · ${fmtAxis(v, metric)}`));
      root.append(dot);
    });
  });
  return root;
}

// --- wiring -------------------------------------------------------------------------------------

function showView() {
  const usage = location.hash === "#usage";
  $("#requests-view").hidden = usage;
  $("#usage-view").hidden = !usage;
  $("#tab-requests").classList.toggle("active", !usage);
  $("#tab-usage").classList.toggle("active", usage);
  if (usage) loadUsage();
  else loadRequests(true);
}

function init() {
  $("#sign-out").hidden = !sessionStorage.getItem(KEY_STORAGE);
  $("#sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    location.reload();
  });
  $("#filters").addEventListener("submit", (event) => {
    event.preventDefault();
    loadRequests(true);
  });
  $("#filters").addEventListener("reset", () => setTimeout(() => loadRequests(true)));
  $("#load-more").addEventListener("click", () => loadRequests(false));
  $("#usage-controls").addEventListener("submit", (event) => {
    event.preventDefault();
    loadUsage();
  });
  $("#usage-group").addEventListener("change", () => {
    $("#usage-property-label").hidden = $("#usage-group").value !== "property";
    if ($("#usage-group").value !== "property") loadUsage();
  });
  for (const id of ["#usage-range", "#usage-metric"]) $(id).addEventListener("change", loadUsage);
  $("#detail-close").addEventListener("click", () => {
    $("#detail").hidden = true;
    if (state.selected) state.selected.classList.remove("selected");
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !$("#detail").hidden) $("#detail-close").click();
  });
  window.addEventListener("hashchange", showView);
  showView();
}

document.addEventListener("DOMContentLoaded", init);
