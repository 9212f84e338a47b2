// ExpertMesh dashboard: a single page over /dashboard/api/* (Bearer key from sessionStorage),
// polled every POLL_MS without reloading; charts by Plotly (served by the gateway from the
// installed plotly package). Every value from the API reaches the page as text (textContent),
// never as HTML.
"use strict";

const POLL_MS = 2000;
const KEY_STORAGE = "expertmesh.dashboard.key";
const PAGES = ["cluster", "experts", "serving", "jobs", "tenants"];
const PLOT_CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"] };
const BASE_LAYOUT = { margin: { l: 50, r: 20, t: 36, b: 40 }, font: { size: 12 }, paper_bgcolor: "#fff",
                      plot_bgcolor: "#fff", legend: { orientation: "h", y: -0.2 } };

const state = { key: sessionStorage.getItem(KEY_STORAGE), who: null, page: null, timer: null, busy: false,
                layer: null, selectedJob: null };

// ---- API -------------------------------------------------------------------------------------------
class Unauthorized extends Error {}

async function api(path) {
  const response = await fetch(`/dashboard/api/${path}`, { headers: { Authorization: `Bearer ${state.key}` } });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON: reported below */ }
  if (response.status === 401) throw new Unauthorized(body?.error?.message || "the key was not accepted");
  if (!response.ok) throw new Error(body?.error?.message || `${response.status} ${response.statusText}`);
  return body;
}

// ---- small DOM helpers -----------------------------------------------------------------------------
const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function pill(text, kind) { return el("span", text, `pill ${kind || ""}`); }

function table(id, headers, rows, onClick, selected) {
  const t = $(id);
  t.replaceChildren();
  const head = el("tr");
  headers.forEach((h) => head.appendChild(el("th", h)));
  t.appendChild(head);
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", "nothing yet", "muted");
    td.colSpan = headers.length;
    tr.appendChild(td);
    t.appendChild(tr);
  }
  rows.forEach((row) => {
    const tr = el("tr");
    row.cells.forEach((cell) => {
      const td = el("td");
      if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell === null || cell === undefined ? "–" : String(cell);
      tr.appendChild(td);
    });
    if (row.attrs) Object.entries(row.attrs).forEach(([k, v]) => tr.setAttribute(k, v));
    if (onClick) { tr.classList.add("clickable"); tr.addEventListener("click", () => onClick(row)); }
    if (selected && row.id === selected) tr.classList.add("selected");
    t.appendChild(tr);
  });
}

function banner(id, text) {
  const node = $(id);
  node.hidden = !text;
  node.textContent = text || "";
}

const fmt = (v, digits = 3) => (v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits));
const ms = (seconds) => (seconds === null || seconds === undefined ? null : seconds * 1000);
const when = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "–");
const dates = (ts) => ts.map((t) => new Date(t * 1000));

// A time axis that ends now and shows at least the last `minS` seconds (a lone point is not a 1 ms axis).
function timeAxis(ts, minS = 120) {
  const now = Date.now();
  const start = Math.min(ts.length ? ts[0] * 1000 : now, now - minS * 1000);
  return { type: "date", range: [new Date(start), new Date(now + 2000)] };
}

function plot(id, traces, layout) {
  Plotly.react(id, traces, { ...BASE_LAYOUT, ...layout }, PLOT_CONFIG);
}

// ---- pages -----------------------------------------------------------------------------------------
async function renderCluster() {
  const c = await api("cluster");
  const ray = c.ray_nodes;
  $("cluster-ray-nodes").textContent = ray ? `${ray.filter((n) => n.alive).length} / ${ray.length}` : "–";
  banner("cluster-message", c.message || "");
  if (!c.attached) {
    ["cluster-node-count", "cluster-slots", "cluster-attention", "cluster-failures", "cluster-replacements",
     "cluster-plan"].forEach((id) => { $(id).textContent = "–"; });
    ["nodes-table", "slots-table", "services-table", "events-table"].forEach((id) => table(id, [], []));
    return;
  }
  $("cluster-node-count").textContent = c.nodes.length;
  $("cluster-slots").textContent = `${c.slots.filter((s) => s.healthy).length} / ${c.slots.length}`;
  $("cluster-attention").textContent = `${c.attention.filter((a) => a.healthy).length} / ${c.attention.length}`;
  $("cluster-failures").textContent = c.failures_recovered;
  $("cluster-replacements").textContent = c.replacements;
  $("cluster-plan").textContent = c.plan_version === null ? "–" : `v${c.plan_version}`;
  table("nodes-table", ["Node", "Ray node id", "Slots", "Health"], c.nodes.map((n) => ({
    cells: [n.index, n.node_id.slice(0, 12), n.slots.join(", "),
            pill(n.healthy ? "healthy" : `${n.healthy_slots}/${n.slots.length} slots up`, n.healthy ? "ok" : "bad")],
    attrs: { "data-node": n.index } })));
  table("slots-table", ["Slot", "Node", "Role", "Physical experts / layer", "Address", "Health"], c.slots.map((s) => ({
    cells: [s.slot, s.node, s.forwarder ? "shard + node forwarder" : "shard", s.experts_per_layer, s.address,
            pill(s.healthy ? "healthy" : "down", s.healthy ? "ok" : "bad")] })));
  const services = [];
  if (c.controller) {
    services.push({ cells: ["controller", c.controller.address,
                            c.controller.plan_version ? `plan v${c.controller.plan_version}` : "",
                            pill(c.controller.healthy ? "healthy" : "down", c.controller.healthy ? "ok" : "bad")] });
  }
  c.attention.forEach((a) => services.push({ cells: [`attention rank ${a.rank}`, a.address, "",
                                                     pill(a.healthy ? "healthy" : "down", a.healthy ? "ok" : "bad")] }));
  table("services-table", ["Service", "Address", "", "Health"], services);
  table("events-table", ["When", "Kind", "Detail"], c.events.map((e) => ({
    cells: [when(e.at), e.kind, eventDetail(e)] })));
}

function eventDetail(e) {
  if (e.kind === "replacement") return `v${e.old} → v${e.new}: ${fmt(e.before)} → ${fmt(e.after)} in ${fmt(e.seconds, 2)} s`;
  return Object.entries(e).filter(([k, v]) => !["kind", "at"].includes(k) && typeof v !== "object")
    .map(([k, v]) => `${k}=${v}`).join(", ");
}

async function renderExperts() {
  const x = await api(state.layer === null ? "experts" : `experts?layer=${state.layer}`);
  banner("experts-message", x.attached ? "" : x.message);
  if (!x.attached) return;
  const select = $("experts-layer");
  if (select.options.length !== x.moe_layers.length) {
    select.replaceChildren(...x.moe_layers.map((l) => { const o = el("option", `layer ${l}`); o.value = l; return o; }));
  }
  select.value = x.layer;
  $("experts-balancedness-now").textContent = fmt(x.balancedness_now);
  $("experts-balancedness-before").textContent = x.replacements ? fmt(x.balancedness_before_last_replacement) : "–";
  $("experts-plan-version").textContent = `v${x.plan_version}`;
  $("experts-replacements").textContent = x.replacements;

  const shapes = x.events.map((e) => ({ type: "line", xref: "x", yref: "paper", x0: new Date(e.at * 1000),
    x1: new Date(e.at * 1000), y0: 0, y1: 1, line: { color: e.kind === "replacement" ? "#2f6fde" : "#d64545", dash: "dot" } }));
  const annotations = x.events.map((e) => ({ x: new Date(e.at * 1000), y: 1, yref: "paper", text: e.kind,
    hovertext: e.label, showarrow: false, yanchor: "bottom", font: { size: 10 } }));
  // the controller's view: the load window scored under the plan in force, jumping at each re-placement
  const steps = { x: [], y: [] };
  x.events.filter((e) => e.kind === "replacement").sort((a, b) => a.at - b.at).forEach((e) => {
    steps.x.push(new Date(e.at * 1000), new Date(e.at * 1000));
    steps.y.push(e.before, e.after);
  });
  if (x.balancedness_now !== null) { steps.x.push(new Date()); steps.y.push(x.balancedness_now); }
  const times = x.history.map((h) => h.t).concat(x.events.map((e) => e.at)).sort((a, b) => a - b);
  plot("chart-balancedness", [
    { x: dates(x.history.map((h) => h.t)), y: x.history.map((h) => h.balancedness), mode: "markers",
      name: "each load report, under the plan then in force", text: x.history.map((h) => `plan v${h.plan_version}`),
      marker: { color: "#1f9d55", size: 6 } },
    { x: steps.x, y: steps.y, mode: "lines+markers", name: `load window (${Math.round(x.load_window_s / 60)} min) under the current plan`,
      line: { color: "#2f6fde", shape: "hv" }, marker: { size: 5 } }],
    { title: { text: "Balancedness over time (mean/max load per slot; events marked)" },
      yaxis: { range: [0, 1.05], title: { text: "balancedness" } }, xaxis: timeAxis(times), shapes, annotations });

  const slotLabels = x.heatmap_slots;
  plot("chart-heatmap", [{ type: "heatmap", z: x.heatmap, x: x.heatmap[0].map((_, e) => `e${e}`), y: slotLabels,
    colorscale: [[0, "#f4f6f9"], [1, "#1f4fa8"]], zmin: 0, xgap: 1, ygap: 1,
    hovertemplate: "%{y}, expert %{x}: %{z} replica(s)<extra></extra>",
    colorbar: { title: { text: "replicas" }, dtick: 1 } }],
    { title: { text: `Placement: slot × logical expert (layer ${x.layer}, plan v${x.plan_version})` },
      yaxis: { autorange: "reversed" }, margin: { l: 110, r: 20, t: 36, b: 40 } });
  plot("chart-expert-load", [{ type: "bar", x: x.expert_load.map((_, e) => `e${e}`), y: x.expert_load,
    marker: { color: "#2f6fde" }, name: "tokens" }],
    { title: { text: `Tokens per logical expert (last ${Math.round(x.load_window_s / 60)} min)` } });
  plot("chart-slot-load", [{ type: "bar", x: x.heatmap_slots, y: x.slot_load,
    marker: { color: "#c27c0e" }, name: "load" }],
    { title: { text: "Load per slot under the current plan" } });
}

async function renderServing() {
  const s = await api("serving");
  banner("serving-message", s.message || (s.endpoints.length ? "" : "No endpoints are deployed for this key."));
  const root = $("serving-endpoints");
  const ids = s.endpoints.map((e) => e.endpoint);
  if (root.dataset.ids !== ids.join("|")) {  // rebuild the cards only when the endpoint set changes
    root.replaceChildren();
    s.endpoints.forEach((e, i) => {
      const card = el("div", null, "card endpoint-card");
      card.setAttribute("data-endpoint", e.endpoint);
      const h = el("h2", e.endpoint);
      h.appendChild(el("span", "", "pill"));
      card.appendChild(h);
      card.appendChild(el("p", "", "summary"));
      const grid = el("div", null, "grid3");
      ["rate", "latency", "depth"].forEach((kind) => {
        const c = el("div", null, "chart");
        c.id = `chart-${kind}-${i}`;
        grid.appendChild(c);
      });
      card.appendChild(grid);
      root.appendChild(card);
    });
    root.dataset.ids = ids.join("|");
  }
  s.endpoints.forEach((e, i) => {
    const card = root.children[i];
    const status = card.querySelector("h2 .pill");
    status.textContent = `${e.status} · ${e.replicas} replica(s)`;
    status.className = `pill ${e.status === "RUNNING" ? "ok" : "warn"}`;
    const series = e.series || { t: [], requests_per_s: [], errors_per_s: [], in_flight: [], window: null };
    const w = series.window;
    card.querySelector(".summary").textContent = w
      ? `window: TTFT p50 ${fmt(ms(w.ttft.p50), 1)} ms · p99 ${fmt(ms(w.ttft.p99), 1)} ms · inter-token p50 ` +
        `${fmt(ms(w.itl.p50), 1)} ms · p99 ${fmt(ms(w.itl.p99), 1)} ms · request p99 ${fmt(ms(w.latency.p99), 1)} ms`
      : "no requests sampled yet";
    const t = dates(series.t);
    plot(`chart-rate-${i}`, [
      { x: t, y: series.requests_per_s, name: "requests/s", mode: "lines", line: { color: "#2f6fde" } },
      { x: t, y: series.errors_per_s, name: "5xx/s", mode: "lines", line: { color: "#d64545" } }],
      { title: { text: "Requests per second" }, xaxis: timeAxis(series.t), yaxis: { rangemode: "tozero" } });
    const lat = [["ttft_p50_s", "TTFT p50", "#1f9d55"], ["ttft_p99_s", "TTFT p99", "#0b6b35"],
                 ["itl_p50_s", "inter-token p50", "#c27c0e"], ["itl_p99_s", "inter-token p99", "#8a5706"]];
    plot(`chart-latency-${i}`, lat.map(([k, name, color]) => ({ x: t, y: (series[k] || []).map(ms), name,
      mode: "lines+markers", connectgaps: false, line: { color } })),
      { title: { text: "Latency percentiles (ms)" }, xaxis: timeAxis(series.t), yaxis: { rangemode: "tozero" } });
    plot(`chart-depth-${i}`, [
      { x: t, y: series.in_flight, name: "in flight at gateway", mode: "lines", line: { color: "#6b7785" } },
      { x: dates(e.replicas_series.t), y: e.replicas_series.replicas, name: "replicas", mode: "lines",
        line: { shape: "hv", color: "#2f6fde" }, yaxis: "y2" }],
      { title: { text: "Queue depth and replicas" }, xaxis: timeAxis(series.t.concat(e.replicas_series.t)),
        yaxis: { rangemode: "tozero", title: { text: "in flight" } },
        yaxis2: { overlaying: "y", side: "right", rangemode: "tozero", dtick: 1, title: { text: "replicas" } } });
  });
}

async function renderJobs() {
  const j = await api("jobs");
  const states = $("jobs-states");
  states.replaceChildren();
  [["queue", j.queue_depth], ...Object.entries(j.states)].forEach(([name, value]) => {
    const k = el("div", null, "kpi");
    k.appendChild(el("span", name === "queue" ? "Waiting for dispatch" : name, "kpi-label"));
    k.appendChild(el("span", value, "kpi-value"));
    states.appendChild(k);
  });
  const kind = { succeeded: "ok", failed: "bad", cancelled: "warn", running: "ok" };
  table("jobs-table", ["Job", "Tenant", "Name", "State", "Submitted", "Started", "Finished", "Note"], j.jobs.map((job) => ({
    id: job.job_id, attrs: { "data-job-id": job.job_id },
    cells: [job.job_id, job.tenant, job.name, pill(job.state, kind[job.state]), when(job.submitted_at),
            when(job.started_at), when(job.finished_at), job.error || job.wait_reason || ""] })),
    (row) => { state.selectedJob = row.id; refresh(); }, state.selectedJob);
  if (state.selectedJob && !j.jobs.some((job) => job.job_id === state.selectedJob)) state.selectedJob = null;
  $("job-detail").hidden = !state.selectedJob;
  if (state.selectedJob) await renderJob(state.selectedJob);
}

async function renderJob(jobId) {
  const job = await api(`jobs/${encodeURIComponent(jobId)}`);
  $("job-title").textContent = `${job.job_id} · ${job.name} (${job.tenant})`;
  $("job-meta").textContent = `state ${job.state}` + (job.checkpoint ? ` · checkpoint ${job.checkpoint}` : "") +
    (job.loss.source ? ` · metrics ${job.loss.source}` : " · no metrics recorded yet");
  plot("chart-loss", [
    { x: job.loss.steps, y: job.loss.loss, name: "train loss", mode: "lines", line: { color: "#2f6fde" } },
    { x: job.loss.val_steps, y: job.loss.val_loss, name: "validation loss", mode: "lines+markers", line: { color: "#c27c0e" } }],
    { title: { text: "Loss curve (nats/token)" }, xaxis: { title: { text: "step" } } });
  const pre = $("job-logs");
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.textContent = job.logs || "(no log output yet)";
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

async function renderTenants() {
  const t = await api("tenants");
  const rows = [];
  t.tenants.forEach((tenant) => tenant.quotas.forEach((q, i) => {
    const bar = el("div", null, "bar");
    const fill = el("span", null, q.fraction >= 0.9 ? "hot" : "");
    fill.style.width = `${Math.min(100, Math.round(q.fraction * 100))}%`;
    bar.appendChild(fill);
    rows.push({ cells: [i === 0 ? tenant.name : "", i === 0 ? pill(tenant.disabled ? "disabled" : "active",
                tenant.disabled ? "bad" : "ok") : "", q.quota, q.used, q.limit, bar],
                attrs: { "data-tenant": tenant.name, "data-quota": q.quota } });
  }));
  table("tenants-table", ["Tenant", "", "Quota", "Used (slots: now; per-minute quotas: last 60 s)", "Limit", ""], rows);
}

const RENDER = { cluster: renderCluster, experts: renderExperts, serving: renderServing, jobs: renderJobs,
                 tenants: renderTenants };

// ---- navigation, polling, login ----------------------------------------------------------------------
async function refresh() {
  if (state.busy || !state.page) return;
  state.busy = true;
  try {
    await RENDER[state.page]();
    $("poll-error").hidden = true;
    $("live").classList.remove("stale");
    $("last-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    if (err instanceof Unauthorized) { signOut(err.message); return; }
    banner("poll-error", `Could not load this page: ${err.message}`);
    $("live").classList.add("stale");
  } finally {
    state.busy = false;
  }
}

function show(page) {
  const allowed = state.who.pages;
  if (!allowed.includes(page)) page = allowed[0];
  state.page = page;
  PAGES.forEach((p) => { $(`page-${p}`).hidden = p !== page; });
  document.querySelectorAll("#nav a").forEach((a) => {
    a.hidden = !allowed.includes(a.dataset.page);
    a.classList.toggle("active", a.dataset.page === page);
  });
  if (location.hash !== `#${page}`) history.replaceState(null, "", `#${page}`);
  refresh().then(() => window.dispatchEvent(new Event("resize")));
}

async function signIn(key) {
  state.key = key;
  try {
    state.who = await api("whoami");
  } catch (err) {
    signOut(err instanceof Unauthorized ? "That key was not accepted." : `Sign-in failed: ${err.message}`);
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, key);
  $("login").hidden = true;
  $("app").hidden = false;
  $("whoami").textContent = state.who.role === "operator" ? "operator" : `tenant ${state.who.tenant}`;
  show((location.hash || "#").slice(1) || state.who.pages[0]);
  clearInterval(state.timer);
  state.timer = setInterval(refresh, POLL_MS);
}

function signOut(message) {
  clearInterval(state.timer);
  sessionStorage.removeItem(KEY_STORAGE);
  Object.assign(state, { key: null, who: null, page: null, selectedJob: null, layer: null });
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("key-input").value = "";
  $("key-input").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (key) signIn(key);
  });
  $("logout").addEventListener("click", () => signOut(""));
  $("experts-layer").addEventListener("change", (event) => { state.layer = Number(event.target.value); refresh(); });
  window.addEventListener("hashchange", () => { if (state.who) show(location.hash.slice(1)); });
  if (state.key) signIn(state.key); else signOut("");
});
