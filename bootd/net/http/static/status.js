// bootd status page: one snapshot of every node, then server-sent updates applied in place.
// Plain JavaScript, no build step, no library. Updates are gathered and drawn once per animation frame,
// so a burst of events costs one layout, not one per event.
"use strict";

const CHAIN = ["discovered", "pxe", "stage1", "fetching", "verified", "booted", "ready"];
const STATES = [...CHAIN, "stale", "dead", "failed", "disabled"];
const $ = (id) => document.getElementById(id);

const nodes = new Map(); // name -> {name, group, state, reason, since, contact, approved, p, tr}
const dirty = new Set();
let role = null, csrf = null, source = null;
let loading = false, buffered = [];
let frame = 0;
let hostSet = null; // names of the hostlist filter, or null
let selected = null;
// For the browser test: when window.bootdMeasure is set, every drawn state change is logged with the time.
window.bootdDrawn = [];

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function clock(ts) {
  if (!ts) return "never";
  const d = new Date(ts * 1000), now = new Date();
  const t = d.toLocaleTimeString([], { hour12: false });
  return d.toDateString() === now.toDateString() ? t : d.toISOString().slice(0, 10) + " " + t;
}

function size(n) {
  if (n >= 1 << 30) return (n / (1 << 30)).toFixed(1) + " GiB";
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(1) + " MiB";
  if (n >= 1 << 10) return (n / (1 << 10)).toFixed(0) + " KiB";
  return n + " B";
}

function stageHtml(n) {
  const i = CHAIN.indexOf(n.state);
  if (i < 0) return `<span class="pips" title="not on the boot chain">-</span>`;
  return `<span class="pips" title="step ${i + 1} of ${CHAIN.length} since ${esc(clock(n.since))}">` +
    `<i>${"\u25a0".repeat(i + 1)}</i>${"\u25a1".repeat(CHAIN.length - i - 1)}</span>`;
}

function progressHtml(n) {
  const p = n.p;
  if (!p || n.state !== "fetching") return "";
  let frac = 0, text = "";
  if (p.bytes_total) { frac = p.bytes / p.bytes_total; text = `${size(p.bytes || 0)} of ${size(p.bytes_total)}`; }
  else if (p.total) { frac = p.done / p.total; text = `${p.done || 0} of ${p.total} chunks`; }
  else return "";
  const pct = Math.max(0, Math.min(100, Math.round(frac * 100)));
  return `<progress max="100" value="${pct}"></progress> ${text}`;
}

function actionHtml(n) {
  return role === "admin" && !n.approved ? `<button type="button" data-approve="${esc(n.name)}">Approve</button>` : "";
}

function cells(n) {
  return `<td>${esc(n.name)}</td><td>${esc(n.group)}</td><td class="st st-${n.state}">${n.state}` +
    `${n.approved ? "" : " (awaiting approval)"}</td><td>${stageHtml(n)}</td><td>${progressHtml(n)}</td>` +
    `<td>${clock(n.contact)}</td><td class="reason">${esc(n.reason)}</td><td>${actionHtml(n)}</td>`;
}

function visible(n) {
  const g = $("f-group").value, s = $("f-state").value;
  return (!g || n.group === g) && (!s || n.state === s) && (!hostSet || hostSet.has(n.name));
}

// -- snapshot ---------------------------------------------------------------------------------------
async function loadSnapshot() {
  loading = true;
  buffered = [];
  const r = await fetch("/status/api/nodes", { credentials: "same-origin" });
  if (r.status === 401) return showLogin();
  if (!r.ok) { setConn("down", `snapshot failed: ${r.status}`); loading = false; return; }
  const snap = await r.json();
  const col = Object.fromEntries(snap.columns.map((c, i) => [c, i]));
  const pcol = snap.progress_columns;
  nodes.clear();
  const html = [];
  for (const row of snap.rows) {
    const n = { name: row[col.name], group: row[col.group], state: row[col.state], reason: row[col.reason],
      since: row[col.since], contact: row[col.contact], approved: row[col.approved], p: null, tr: null };
    const p = snap.progress[n.name];
    if (p) n.p = Object.fromEntries(pcol.map((c, i) => [c, p[i]]));
    nodes.set(n.name, n);
    html.push(`<tr data-name="${esc(n.name)}">${cells(n)}</tr>`);
  }
  const tbody = $("rows");
  tbody.innerHTML = html.join("");
  let i = 0;
  for (const n of nodes.values()) { n.tr = tbody.rows[i++]; if (!visible(n)) n.tr.hidden = true; }
  fillSelects();
  loading = false;
  for (const u of buffered) apply(u);
  buffered = [];
  drawCounts();
  schedule();
  window.bootdLoaded = performance.now();
}

function fillSelects() {
  const groups = [...new Set([...nodes.values()].map((n) => n.group))].sort();
  const sel = $("f-group"), cur = sel.value;
  sel.innerHTML = `<option value="">all</option>` + groups.map((g) => `<option>${esc(g)}</option>`).join("");
  sel.value = groups.includes(cur) ? cur : "";
}

// -- updates ----------------------------------------------------------------------------------------
function apply(u) {
  if (loading) { buffered.push(u); return; }
  let n = nodes.get(u.node);
  if (u.t === "removed") {
    if (n) { n.tr.remove(); nodes.delete(u.node); dirty.delete(u.node); }
    return;
  }
  if (!n) {
    if (u.t !== "state") return; // a contact of a node this page has not seen: the next snapshot has it
    n = { name: u.node, group: u.group, state: u.state, reason: "", since: 0, contact: 0, approved: true, p: null };
    n.tr = document.createElement("tr");
    n.tr.dataset.name = u.node;
    $("rows").appendChild(n.tr);
    nodes.set(u.node, n);
  }
  if (u.t === "state") {
    if (u.since < n.since) return; // older than what the snapshot showed (a change made by another process)
    Object.assign(n, { group: u.group, state: u.state, reason: u.reason, since: u.since, approved: u.approved });
    n.contact = Math.max(n.contact, u.contact);
    if (u.state !== "fetching") n.p = null;
  } else if (u.t === "progress") {
    n.p = { done: u.done, total: u.total, bytes: u.bytes, bytes_total: u.bytes_total };
    n.contact = Math.max(n.contact, u.contact);
  } else if (u.t === "contact") {
    n.contact = Math.max(n.contact, u.contact);
  }
  dirty.add(u.node);
  schedule();
}

function schedule() {
  if (!frame) frame = requestAnimationFrame(draw);
}

function draw() {
  frame = 0;
  const now = Date.now() / 1000;
  for (const name of dirty) {
    const n = nodes.get(name);
    if (!n) continue;
    n.tr.innerHTML = cells(n);
    n.tr.hidden = !visible(n);
    if (window.bootdMeasure) window.bootdDrawn.push([name, n.state, now]);
    if (name === selected) openTimeline(name);
  }
  if (dirty.size) drawCounts();
  dirty.clear();
}

function drawCounts() {
  const counts = Object.fromEntries(STATES.map((s) => [s, 0]));
  for (const n of nodes.values()) counts[n.state] = (counts[n.state] || 0) + 1;
  const active = $("f-state").value;
  $("counts").innerHTML = `<span class="count${active ? "" : " active"}" data-state=""><b>${nodes.size}</b>all</span>` +
    STATES.map((s) => `<span class="count${active === s ? " active" : ""}" data-state="${s}">` +
      `<b class="st st-${s}">${counts[s]}</b>${s}</span>`).join("");
  let shown = 0;
  for (const n of nodes.values()) if (!n.tr.hidden) shown++;
  $("shown").textContent = `${shown} shown`;
}

function refilter() {
  for (const n of nodes.values()) n.tr.hidden = !visible(n);
  drawCounts();
}

// -- the stream -------------------------------------------------------------------------------------
function setConn(cls, text) { const c = $("conn"); c.className = "conn " + cls; c.textContent = text; }

function connect() {
  if (source) source.close();
  source = new EventSource("/status/api/events");
  source.addEventListener("hello", () => { setConn("live", "live"); loadSnapshot(); });
  source.addEventListener("resync", () => loadSnapshot());
  source.onmessage = (e) => { for (const u of JSON.parse(e.data)) apply(u); };
  source.onerror = async () => {
    setConn("down", "reconnecting");
    if (source.readyState === EventSource.CLOSED) {
      // Refused (logged out, expired, or too many streams): ask why, then log in or retry.
      const r = await fetch("/status/api/session", { credentials: "same-origin" });
      if (r.status === 401) showLogin(); else setTimeout(connect, 5000);
    }
  };
}

// -- timeline ---------------------------------------------------------------------------------------
async function openTimeline(name) {
  selected = name;
  for (const tr of document.querySelectorAll("tr.sel")) tr.classList.remove("sel");
  const n = nodes.get(name);
  if (n) n.tr.classList.add("sel");
  const r = await fetch(`/status/api/nodes/${encodeURIComponent(name)}/timeline`, { credentials: "same-origin" });
  if (selected !== name) return;
  const aside = $("timeline");
  aside.hidden = false;
  $("tl-title").textContent = name;
  if (!r.ok) { $("tl-node").innerHTML = ""; $("tl-events").innerHTML = `<li class="error">${esc(await r.text())}</li>`; return; }
  const t = await r.json();
  const fields = [["state", t.node.state], ["group", t.node.group], ["MAC", t.node.mac], ["IP", t.node.ip || "-"],
    ["capsule", t.node.capsule || "(group's)"], ["first contact", clock(t.node.first_contact)],
    ["last contact", clock(t.node.contact)]];
  $("tl-node").innerHTML = fields.map(([k, v]) => `<dt>${k}</dt><dd>${esc(v)}</dd>`).join("");
  $("tl-events").innerHTML = t.events.slice().reverse().map((e) =>
    `<li><span class="st st-${esc(e.state)}">${esc(e.state)}</span> ${esc(clock(e.ts))}` +
    (e.reason ? `<small>${esc(e.reason)}</small>` : "") + (e.detail ? `<small>${esc(e.detail)}</small>` : "") +
    `</li>`).join("") || "<li>no events</li>";
}

// -- login and actions ------------------------------------------------------------------------------
function showLogin() {
  if (source) { source.close(); source = null; }
  $("main").hidden = true;
  $("logout").hidden = true;
  $("who").textContent = "";
  $("login").hidden = false;
  setConn("down", "logged out");
  loading = false;
}

function started(s) {
  role = s.role; csrf = s.csrf;
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = false;
  $("who").textContent = role === "admin" ? "admin" : "viewer (read-only)";
  connect();
}

async function act(url) {
  const r = await fetch(url, { method: "POST", credentials: "same-origin",
    headers: { "X-CSRF-Token": csrf, "Content-Type": "application/json" }, body: "{}" });
  if (!r.ok) alert(await r.text());
  return r;
}

function init() {
  STATES.forEach((s) => $("f-state").insertAdjacentHTML("beforeend", `<option>${s}</option>`));
  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const r = await fetch("/status/api/login", { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token: $("token").value.trim() }) });
    $("token").value = "";
    if (!r.ok) { $("login-error").textContent = await r.text(); return; }
    $("login-error").textContent = "";
    started(await r.json());
  });
  $("logout").addEventListener("click", async () => { await act("/status/api/logout"); showLogin(); });
  $("rows").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-approve]");
    if (b) { e.stopPropagation(); act(`/status/api/nodes/${encodeURIComponent(b.dataset.approve)}/approve`); return; }
    const tr = e.target.closest("tr");
    if (tr) openTimeline(tr.dataset.name);
  });
  $("tl-close").addEventListener("click", () => { selected = null; $("timeline").hidden = true; });
  $("counts").addEventListener("click", (e) => {
    const c = e.target.closest(".count");
    if (c) { $("f-state").value = c.dataset.state; refilter(); }
  });
  $("f-group").addEventListener("change", refilter);
  $("f-state").addEventListener("change", refilter);
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  $("f-hostlist").addEventListener("change", async () => {
    const expr = $("f-hostlist").value.trim();
    $("filter-error").textContent = "";
    if (!expr) { hostSet = null; refilter(); return; }
    const r = await fetch(`/status/api/hostlist?expr=${encodeURIComponent(expr)}`, { credentials: "same-origin" });
    if (!r.ok) { $("filter-error").textContent = await r.text(); return; }
    hostSet = new Set((await r.json()).names);
    refilter();
  });
  fetch("/status/api/session", { credentials: "same-origin" }).then(async (r) => {
    if (r.ok) started(await r.json()); else showLogin();
  });
}

init();
