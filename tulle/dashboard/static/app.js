// The Tulle dashboard's page: one server-sent-events stream carries every view's data
// (status, topology, routes, policy, identity, extensions, events); each view renders
// from the latest message of its kind. Text only through textContent: nothing from the
// bus is ever parsed as HTML.
"use strict";

const state = { topology: null, routes: null, policy: null, identity: null, extensions: null, status: null,
                events: [], eventTypes: new Set(), history: { t: [], rps: new Map(), success: new Map() } };
const MAX_EVENTS = 500;
const MAX_POINTS = 150;

// --- small helpers ---------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("data-")) el.setAttribute(k, String(v));
    else if (k === "title") el.title = String(v);
    else el[k] = v;
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const $ = (sel) => document.querySelector(sel);
const pct = (v) => (v === null || v === undefined ? "-" : (v * 100).toFixed(2) + "%");
const rps = (v) => (v === null || v === undefined ? "-" : v.toFixed(1));
const ms = (v) => (v === null || v === undefined ? "-" : Math.round(v) + " ms");
function duration(s) {
  if (s === null || s === undefined) return "-";
  const neg = s < 0; s = Math.abs(s);
  const d = Math.floor(s / 86400), hh = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  const text = d ? `${d}d ${hh}h` : hh ? `${hh}h ${m}m` : m ? `${m}m ${Math.floor(s % 60)}s` : `${Math.floor(s)}s`;
  return neg ? `${text} ago` : `in ${text}`;
}
const isoTime = (unix) => (unix ? new Date(unix * 1000).toISOString().replace(".000Z", "Z") : "-");
function fillBody(table, rows) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows);
}
function numCell(text, extra) { return h("td", Object.assign({ class: "num" }, extra || {}), text); }
function nodeName(id, nodes) {
  const n = nodes.get(id);
  if (!n) return id;
  if (n.kind === "workload") return `${n.namespace}/${n.name}`;
  if (n.kind === "service") return `svc ${n.namespace}/${n.name}`;
  return n.name;
}

// --- views -----------------------------------------------------------------------------------

const VIEWS = ["topology", "workloads", "routes", "authorization", "identity", "events", "extensions"];
function showView() {
  const want = (location.hash || "#topology").slice(1);
  const view = VIEWS.includes(want) ? want : "topology";
  for (const v of VIEWS) {
    $(`#view-${v}`).classList.toggle("active", v === view);
    $(`#nav a[data-view="${v}"]`).classList.toggle("active", v === view);
  }
  document.body.dataset.view = view;
  if (view === "topology" && graph.cy) { graph.cy.resize(); graph.cy.fit(undefined, 30); }
  if (view === "workloads") renderCharts(true);
}
window.addEventListener("hashchange", showView);

function renderStatus() {
  const s = state.status;
  const el = $("#status");
  el.dataset.connected = s ? String(s.connected) : "unknown";
  $("#status-text").textContent = s ? `${s.connected ? "connected to" : "not connected to"} ${s.url} · tulle ${s.version}`
                                     : "connecting…";
  for (const w of document.querySelectorAll(".window")) w.textContent = s ? `last ${s.window_s}s, live` : "";
}

// Topology: cytoscape draws the graph; the table under it says the same in text.
const graph = { cy: null, nodeKey: "" };
function edgeLabel(e) {
  const parts = [];
  if (e.denied_total) parts.push(`DENIED ${e.denied_total}`);
  parts.push(e.mtls === true ? "mTLS" : e.mtls === "mixed" ? "partly mTLS" : "no mTLS");
  if (e.protocol === "http") parts.push(e.denied_total ? `${rps(e.rps)} rps` : `${pct(e.success)} · ${rps(e.rps)} rps`);
  else parts.push(`tcp ${e.tcp_open} open`);
  return parts.join(" · ");
}
function nodeLabel(n) {
  const name = n.kind === "service" ? `svc/${n.name}` : n.name;
  const inb = n.inbound;
  if (!inb || (!inb.requests && !inb.tcp_open)) return name;
  return inb.requests ? `${name}\n${pct(inb.success)} · ${rps(inb.rps)} rps` : `${name}\ntcp ${inb.tcp_open} open`;
}
// Callers on the left, the called on the right: each node's column is the longest chain
// of callers before it (cycles cut), its row its place among the column's nodes.
function layered(elements) {
  const nodes = elements.filter((e) => e.group === "nodes").map((e) => e.data.id).sort();
  const into = new Map(nodes.map((n) => [n, []]));
  for (const e of elements) if (e.group === "edges" && e.data.source !== e.data.target) into.get(e.data.target).push(e.data.source);
  const depth = new Map();
  const visit = (n, seen) => {
    if (depth.has(n)) return depth.get(n);
    if (seen.has(n)) return 0;
    seen.add(n);
    const d = Math.max(-1, ...into.get(n).map((m) => visit(m, seen))) + 1;
    seen.delete(n);
    depth.set(n, d);
    return d;
  };
  nodes.forEach((n) => visit(n, new Set()));
  const columns = new Map();
  for (const n of nodes) {
    const d = depth.get(n);
    if (!columns.has(d)) columns.set(d, []);
    columns.get(d).push(n);
  }
  const positions = new Map();
  for (const [d, column] of columns) column.forEach((n, i) => positions.set(n, { x: d * 300, y: (i - (column.length - 1) / 2) * 140 }));
  return positions;
}

function renderTopology() {
  const t = state.topology;
  if (!t) return;
  const showUnmeshed = $("#show-unmeshed").checked;
  const nodes = new Map(t.nodes.map((n) => [n.id, n]));
  // Clients outside the mesh are mostly health probes: shown when asked, or when denied.
  const edges = t.edges.filter((e) => showUnmeshed || e.source !== "ext:unmeshed" || e.denied_total);
  const used = new Set(edges.flatMap((e) => [e.source, e.target]));
  const shown = t.nodes.filter((n) => n.kind === "workload" || used.has(n.id));
  fillBody($("#edges"), edges.map((e) => h("tr", {
      class: e.denied_total ? "denied" : "", "data-src": nodeName(e.source, nodes), "data-dst": nodeName(e.target, nodes),
      "data-mtls": String(e.mtls), "data-denied": String(e.denied_total), "data-protocol": e.protocol },
    h("td", {}, nodeName(e.source, nodes)), h("td", {}, nodeName(e.target, nodes)),
    h("td", { class: e.mtls === true ? "yes" : "no" }, e.mtls === true ? "yes" : e.mtls === "mixed" ? "partly" : "no"),
    numCell(e.protocol === "http" ? pct(e.success) : "-"), numCell(e.protocol === "http" ? rps(e.rps) : "-"),
    numCell(ms(e.p95_ms)), numCell(String(e.tcp_open)), numCell(e.denied_total ? String(e.denied_total) : "-"))));
  $("#topology-missing").textContent = t.missing.length ? `no answer from: ${t.missing.join(", ")}` : "";
  if (typeof cytoscape === "undefined") return;
  const elements = [
    ...shown.map((n) => ({ group: "nodes", data: { id: n.id, label: nodeLabel(n) },
                           classes: [n.kind, n.meshed ? "meshed" : "unmeshed"].join(" ") })),
    ...edges.filter((e) => nodes.has(e.source) && nodes.has(e.target)).map((e) => ({ group: "edges",
      data: { id: e.id, source: e.source, target: e.target, label: edgeLabel(e) },
      classes: e.denied_total ? "denied" : e.mtls === true ? "mtls" : "plain" })),
  ];
  const key = elements.map((el) => el.data.id).sort().join("|");
  if (!graph.cy) {
    graph.cy = cytoscape({
      container: $("#graph"), elements, maxZoom: 1.6, minZoom: 0.3,
      style: [
        { selector: "node", style: { "label": "data(label)", "text-wrap": "wrap", "text-valign": "bottom", "text-margin-y": 6,
            "font-size": 11, "background-color": "#2b6cb0", "width": 34, "height": 34, "color": "#1d2430" } },
        { selector: "node.unmeshed", style: { "background-color": "#a0aec0" } },
        { selector: "node.service", style: { "shape": "round-rectangle" } },
        { selector: "node.external", style: { "shape": "diamond", "background-color": "#718096" } },
        { selector: "edge", style: { "label": "data(label)", "curve-style": "bezier", "target-arrow-shape": "triangle",
            "font-size": 10, "text-rotation": "autorotate", "text-background-color": "#fff", "text-background-opacity": 0.85,
            "text-background-padding": 2, "width": 2 } },
        { selector: "edge.mtls", style: { "line-color": "#1f8a4c", "target-arrow-color": "#1f8a4c" } },
        { selector: "edge.plain", style: { "line-color": "#b7791f", "target-arrow-color": "#b7791f", "line-style": "dashed" } },
        { selector: "edge.denied", style: { "line-color": "#c53030", "target-arrow-color": "#c53030", "line-style": "dashed",
            "width": 3, "color": "#c53030" } },
      ],
    });
    graph.nodeKey = "";
  }
  const cy = graph.cy;
  if (key !== graph.nodeKey) {
    cy.elements().remove();
    cy.add(elements);
    const positions = layered(elements);
    cy.layout({ name: "preset", positions: (node) => positions.get(node.id()), fit: true, padding: 50 }).run();
    graph.nodeKey = key;
  } else {
    for (const el of elements) {
      const c = cy.getElementById(el.data.id);
      c.data("label", el.data.label);
      c.classes(el.classes);
    }
  }
}
$("#show-unmeshed").addEventListener("change", () => { graph.nodeKey = ""; renderTopology(); });

// Workloads: the nodes' inbound figures, and their history in two charts.
function renderWorkloads() {
  const t = state.topology;
  if (!t) return;
  const rows = t.nodes.filter((n) => n.kind === "workload").map((n) => {
    const i = n.inbound || {}, o = n.outbound || {};
    return h("tr", { "data-workload": `${n.namespace}/${n.name}`, "data-rps": i.rps ?? "", "data-success": i.success ?? "" },
      h("td", {}, `${n.namespace}/${n.name}`), h("td", { class: n.meshed ? "yes" : "no" }, n.meshed ? "yes" : "no"),
      numCell(pct(i.success)), numCell(rps(i.rps)), numCell(ms(i.p50_ms)), numCell(ms(i.p95_ms)), numCell(ms(i.p99_ms)),
      numCell(i.tcp_open ?? "-"), numCell(rps(o.rps)), numCell(i.denied ? String(i.denied) : "-"));
  });
  fillBody($("#workloads"), rows);
  const hist = state.history;
  hist.t.push(t.time);
  for (const n of t.nodes.filter((n) => n.kind === "workload")) {
    const id = `${n.namespace}/${n.name}`;
    for (const [series, value] of [[hist.rps, n.inbound ? n.inbound.rps : null], [hist.success, n.inbound ? n.inbound.success : null]]) {
      if (!series.has(id)) series.set(id, new Array(hist.t.length - 1).fill(null));
      series.get(id).push(value);
    }
  }
  for (const series of [hist.rps, hist.success]) for (const arr of series.values()) while (arr.length < hist.t.length) arr.push(null);
  if (hist.t.length > MAX_POINTS) {
    hist.t.shift();
    for (const series of [hist.rps, hist.success]) for (const arr of series.values()) arr.shift();
  }
  renderCharts(false);
}
const charts = { rps: null, success: null, keys: "" };
const COLOURS = ["#2b6cb0", "#1f8a4c", "#b7791f", "#c53030", "#6b46c1", "#2c7a7b", "#d53f8c", "#4a5568"];
function renderCharts(resize) {
  if (typeof uPlot === "undefined" || document.body.dataset.view !== "workloads") return;
  const hist = state.history;
  const ids = [...hist.rps.keys()].sort();
  const key = ids.join("|");
  const width = Math.max(300, $("#view-workloads").clientWidth - 20);
  for (const [name, series, el, fmt] of [["rps", hist.rps, "#rps-chart", (v) => (v === null ? "-" : v.toFixed(1))],
                                         ["success", hist.success, "#success-chart", (v) => (v === null ? "-" : (v * 100).toFixed(1) + "%")]]) {
    const data = [hist.t, ...ids.map((id) => series.get(id))];
    if (!charts[name] || charts.keys !== key) {
      if (charts[name]) charts[name].destroy();
      charts[name] = new uPlot({ width, height: 180, scales: { x: { time: true } },
        series: [{}, ...ids.map((id, i) => ({ label: id, stroke: COLOURS[i % COLOURS.length], width: 2, value: (u, v) => fmt(v) }))],
        axes: [{}, { size: 70, values: (u, vals) => vals.map(fmt) }] }, data, $(el));
    } else {
      charts[name].setData(data);
      if (resize) charts[name].setSize({ width, height: 180 });
    }
  }
  charts.keys = key;
}

function renderRoutes() {
  const r = state.routes;
  if (!r) return;
  fillBody($("#routes"), r.routes.map((x) => h("tr", { "data-service": `${x.service}.${x.namespace}`, "data-route": x.route },
    h("td", {}, `${x.service}.${x.namespace}`), h("td", {}, x.route),
    h("td", { class: x.retries ? "yes" : "" }, x.retries ? "yes" : "no"),
    numCell(pct(x.effective_success)), numCell(pct(x.actual_success)), numCell(rps(x.effective_rps)), numCell(rps(x.actual_rps)),
    numCell(ms(x.p50_ms)), numCell(ms(x.p95_ms)), numCell(ms(x.p99_ms)))));
}

function renderPolicy() {
  const p = state.policy;
  if (!p) return;
  const select = $("#explain-workload");
  const chosen = select.value;
  select.replaceChildren(...p.workloads.map((w) => h("option", { value: w.key }, `${w.namespace}/${w.workload}`)));
  if (chosen) select.value = chosen;
  $("#policies").replaceChildren(...p.workloads.map((w) => h("div", { class: "policy", "data-workload": w.key },
    h("h3", {}, `${w.namespace}/${w.workload}`),
    h("p", { class: "hint" }, `default policy ${w.default_policy}` + (w.default_policy_from ? ` (from ${w.default_policy_from})` : "")),
    h("table", { class: "data" },
      h("thead", {}, h("tr", {}, ...["port", "server", "protocol", "authorizations", "source"].map((c) => h("th", {}, c)))),
      h("tbody", {}, ...w.ports.map((port) => h("tr", {},
        h("td", {}, port.port === null ? "other" : String(port.port)), h("td", {}, port.server), h("td", {}, port.protocol),
        h("td", {}, port.authorizations.length ? h("ul", {}, ...port.authorizations.map((a) => h("li", {}, a.text)))
                                               : h("span", { class: "bad" }, "(none: denied)")),
        h("td", {}, port.source || "-"))))),
    ...w.warnings.map((x) => h("p", { class: "bad" }, `warning: ${x}`)))));
}
$("#explain-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const params = new URLSearchParams({ workload: $("#explain-workload").value, from: $("#explain-from").value.trim() });
  const port = $("#explain-port").value.trim();
  if (port) params.set("port", port);
  const out = $("#explain-result");
  try {
    const resp = await fetch(`/api/explain?${params}`);
    const body = await resp.json();
    if (!resp.ok) { out.replaceChildren(h("p", { class: "bad" }, body.error)); return; }
    out.replaceChildren(h("p", { class: body.allowed ? "allowed" : "denied", "data-allowed": String(body.allowed) },
        `${body.allowed ? "allowed" : "denied"}: ${body.client}${body.tls ? " over TLS" : " in plain text"} → ${body.workload.replace(".", "/")}`),
      ...body.ports.map((e) => h("div", { class: "explain-port" },
        h("p", {}, `${e.port ? "port " + e.port : "other ports"} (${e.server}): `,
          h("span", { class: e.allowed ? "allowed" : "denied" }, e.allowed ? e.reason : `denied: ${e.reason}`)),
        h("ul", {}, ...e.rules.map((r) => h("li", {}, `${r.admits ? "+" : "−"} ${r.authorization}: ${r.why}${r.condition ? " " + r.condition : ""}`))))));
  } catch (err) {
    out.replaceChildren(h("p", { class: "bad" }, `the dashboard did not answer: ${err}`));
  }
});

function renderIdentity() {
  const id = state.identity;
  if (!id) return;
  $("#trust").replaceChildren(h("dt", {}, "trust domain"), h("dd", {}, id.trust_domain || "- (no trust bundle published)"),
    h("dt", {}, "issuer certificate expires"),
    h("dd", { "data-issuer-expiry": id.issuer_expiry || "" }, id.issuer_expiry ? `${isoTime(id.issuer_expiry)} (${duration(id.issuer_expires_in_s)})` : "-"));
  fillBody($("#anchors"), id.anchors.map((a) => h("tr", {}, h("td", {}, a.subject), h("td", {}, isoTime(a.not_after)),
    h("td", { class: "mono" }, a.fingerprint.slice(0, 16) + "…"))));
  fillBody($("#proxies"), id.proxies.map((p) => h("tr", { "data-proxy": `${p.namespace}/${p.workload}`, "data-cert-expiry": p.cert_expiry || "" },
    h("td", {}, `${p.namespace}/${p.workload}`), h("td", { class: "mono" }, p.identity),
    h("td", { class: p.expires_in_s !== null && p.expires_in_s < 3600 ? "bad" : "" },
      p.cert_expiry ? `${isoTime(p.cert_expiry)} (${duration(p.expires_in_s)})` : "-"),
    h("td", { class: p.trusts_installation === false ? "bad" : "" }, p.trusts_installation === null ? "-" : p.trusts_installation ? "yes" : "no"),
    h("td", { class: p.ready ? "yes" : "no" }, p.ready ? "yes" : "no"), h("td", {}, p.version),
    h("td", {}, p.heartbeat_age_s === null ? "-" : `${p.heartbeat_age_s}s ago`))));
}

// Events: newest first; the filter is `tulle events --type`'s: kind.type with * wildcards,
// and a pattern without a dot matches either part.
function globToRegExp(glob) {
  return new RegExp("^" + glob.replace(/[.+?^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*") + "$");
}
function typeMatches(pattern, kindType) {
  if (!pattern) return true;
  const re = globToRegExp(pattern);
  if (!pattern.includes(".")) {
    const dot = kindType.indexOf(".");
    return re.test(kindType.slice(0, dot)) || re.test(kindType.slice(dot + 1));
  }
  return re.test(kindType);
}
function summary(data) {
  return Object.entries(data).map(([k, v]) => {
    let s = typeof v === "object" && v !== null ? JSON.stringify(v) : String(v);
    if (s.length > 80) s = s.slice(0, 77) + "...";
    return `${k}=${s}`;
  }).join(" ");
}
function eventRow(e) {
  return h("tr", { "data-type": e.type, "data-id": e.id, "data-shown-at": String(Date.now()) },
    h("td", { class: "mono" }, e.time), h("td", {}, e.type), h("td", { class: "mono" }, e.source),
    h("td", {}, e.subject || ""), h("td", { class: "data" }, summary(e.data)));
}
function addEvents(items, replay) {
  const pattern = $("#event-filter").value.trim();
  const body = $("#events").tBodies[0];
  if (replay) {  // a (re)opened stream starts with the server's ring: it replaces what we had
    state.events = [];
    body.replaceChildren();
  }
  for (const e of items) {
    state.events.push(e);
    if (!state.eventTypes.has(e.type)) {
      state.eventTypes.add(e.type);
      $("#event-types").append(h("option", { value: e.type }));
    }
    if (typeMatches(pattern, e.type)) body.prepend(eventRow(e));
  }
  while (state.events.length > MAX_EVENTS) state.events.shift();
  while (body.rows.length > MAX_EVENTS) body.deleteRow(body.rows.length - 1);
  $("#event-count").textContent = `${body.rows.length} shown of ${state.events.length} kept`;
}
$("#event-filter").addEventListener("input", () => {
  const pattern = $("#event-filter").value.trim();
  fillBody($("#events"), state.events.filter((e) => typeMatches(pattern, e.type)).reverse().map(eventRow));
  $("#event-count").textContent = `${$("#events").tBodies[0].rows.length} shown of ${state.events.length} kept`;
});

function renderExtensions() {
  const x = state.extensions;
  if (!x) return;
  $("#extensions-mode").textContent = (x.mode === "local" ? "the local mesh of `tulle up`" : "a Kubernetes installation") +
    (x.error ? ` — ${x.error}` : "");
  fillBody($("#components"), x.components.map((c) => h("tr", { "data-component": c.name, "data-healthy": String(c.healthy) },
    h("td", {}, c.name), h("td", {}, c.kind), h("td", {}, c.version || "-"),
    h("td", { class: c.healthy ? "yes" : "bad" }, c.healthy ? "healthy" : "unhealthy"),
    h("td", {}, [c.detail, c.restarts ? `${c.restarts} restarts` : ""].filter(Boolean).join(", ")))));
  if (!x.check) return;
  $("#check").replaceChildren(...x.check.categories.map((cat) => h("div", { class: "check-category" },
      h("h4", {}, cat.categoryName),
      ...cat.checks.map((c) => h("div", { class: `check-line ${c.result}` }, c.description,
        c.error ? h("span", { class: "detail" }, c.error) : null, c.hint ? h("span", { class: "detail" }, `hint: ${c.hint}`) : null)))),
    h("p", { "data-success": String(x.check.success) }, `Status check results are ${x.check.success ? "\u221A" : "\u00D7"}`));
}

// --- the stream -------------------------------------------------------------------------------

function connect() {
  const source = new EventSource("/api/stream");
  const on = (kind, fn) => source.addEventListener(kind, (msg) => { state[kind] = JSON.parse(msg.data); fn(); });
  on("status", renderStatus);
  on("topology", () => { renderTopology(); renderWorkloads(); });
  on("routes", renderRoutes);
  on("policy", renderPolicy);
  on("identity", renderIdentity);
  on("extensions", renderExtensions);
  source.addEventListener("events", (msg) => { const m = JSON.parse(msg.data); addEvents(m.items, m.replay); });
  source.onerror = () => {
    $("#status").dataset.connected = "false";
    $("#status-text").textContent = "the dashboard is not answering; retrying…";
  };
}

showView();
connect();
