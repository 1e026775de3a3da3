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
const stats = window.bootdStats = { hello: 0, resync: 0, snapshots: 0, errors: 0, messages: 0, states: 0, older: 0 };

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// By hand: toLocaleTimeString costs ~0.3 ms a call, seconds for a table of 5,000 nodes.
const pad = (x) => (x < 10 ? "0" : "") + x;
function clock(ts) {
  if (!ts) return "never";
  const d = new Date(ts * 1000), now = new Date();
  const t = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  if (d.getFullYear() === now.getFullYear() && d.getMonth() === now.getMonth() && d.getDate() === now.getDate()) return t;
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${t}`;
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
  return `<span>${esc(n.name)}</span><span>${esc(n.group)}</span><span class="st st-${n.state}">${n.state}` +
    `${n.approved ? "" : " (unapproved)"}</span><span>${stageHtml(n)}</span><span>${progressHtml(n)}</span>` +
    `<span>${clock(n.contact)}</span><span class="reason" title="${esc(n.reason)}">${esc(n.reason)}</span>` +
    `<span>${actionHtml(n)}</span>`;
}

let fGroup = "", fState = ""; // the filter's values, read once per change (not once per node)
function visible(n) {
  return (!fGroup || n.group === fGroup) && (!fState || n.state === fState) && (!hostSet || hostSet.has(n.name));
}

// -- snapshot ---------------------------------------------------------------------------------------
// The snapshot and the stream start together (one round trip less). The stream's hello says how many
// updates the bus had published when it subscribed; a snapshot read before that may miss some of them,
// so it is fetched again. A snapshot read after it misses nothing: the stream queued the rest.
let snapSeq = null, helloSeq = null, inFlight = false, again = false;

async function loadSnapshot() {
  if (inFlight) { again = true; return; } // asked again while reading: read once more afterwards
  inFlight = loading = true;
  again = false;
  buffered = [];
  let r;
  try {
    r = await fetch("/status/api/nodes", { credentials: "same-origin" });
  } finally {
    inFlight = false;
  }
  if (r.status === 401) return showLogin();
  if (!r.ok) { setConn("down", `snapshot failed: ${r.status}`); loading = false; return; }
  const T = window.bootdT = { got: performance.now() };
  const snap = await r.json();
  T.parsed = performance.now();
  snapSeq = snap.seq;
  stats.snapshots++;
  const col = Object.fromEntries(snap.columns.map((c, i) => [c, i]));
  const pcol = snap.progress_columns;
  nodes.clear();
  for (const row of snap.rows) {
    const n = { name: row[col.name], group: row[col.group], state: row[col.state], reason: row[col.reason],
      since: row[col.since], contact: row[col.contact], approved: row[col.approved], p: null, tr: null };
    const p = snap.progress[n.name];
    if (p) n.p = Object.fromEntries(pcol.map((c, i) => [c, p[i]]));
    nodes.set(n.name, n);
  }
  T.built = performance.now();
  // The first screen of rows now, the rest in slices after it is painted: the counts and the first rows
  // show at once, and a slice at a time keeps the page answering while 5,000 rows are laid out.
  const list = $("rows"), order = [...nodes.values()], gen = ++renderGen;
  list.textContent = "";
  renderRows(list, order, 0, FIRST_ROWS);
  T.inner = performance.now();
  fillSelects();
  loading = false;
  for (const u of buffered) apply(u);
  buffered = [];
  drawCounts();
  schedule();
  window.bootdLoaded = performance.now();
  if (again) loadSnapshot(); else checkSeq();
  requestAnimationFrame(() => setTimeout(() => {
    window.bootdPainted = performance.now(); // navigation to counts and first rows on screen (the browser test)
    let i = FIRST_ROWS;
    const more = () => {
      if (gen !== renderGen) return; // a newer snapshot replaced this one
      renderRows(list, order, i, i + SLICE_ROWS);
      i += SLICE_ROWS;
      if (i < order.length) setTimeout(more, 0);
      else requestAnimationFrame(() => setTimeout(() => { window.bootdComplete = performance.now(); }, 0));
    };
    more();
  }, 0));
}

const FIRST_ROWS = 100, SLICE_ROWS = 500;
let renderGen = 0;

// Rows for order[a..b), drawn from the model as it is now (updates that came first are in it).
function renderRows(list, order, a, b) {
  const part = order.slice(a, b).filter((n) => nodes.get(n.name) === n && !n.tr);
  if (!part.length) return;
  const before = list.children.length;
  list.insertAdjacentHTML("beforeend",
    part.map((n) => `<div class="row" role="row" data-name="${esc(n.name)}">${cells(n)}</div>`).join(""));
  let tr = list.children[before];
  for (const n of part) {
    n.tr = tr;
    tr = tr.nextElementSibling;
    if (!visible(n)) n.tr.hidden = true;
    if (window.bootdMeasure) window.bootdDrawn.push([n.name, n.state, Date.now() / 1000, n.at || n.since]);
  }
}

function fillSelects() {
  const groups = [...new Set([...nodes.values()].map((n) => n.group))].sort();
  const sel = $("f-group"), cur = sel.value;
  sel.innerHTML = `<option value="">all</option>` + groups.map((g) => `<option>${esc(g)}</option>`).join("");
  sel.value = groups.includes(cur) ? cur : "";
  fGroup = sel.value;
}

// -- updates ----------------------------------------------------------------------------------------
function apply(u) {
  if (loading) { buffered.push(u); return; }
  let n = nodes.get(u.node);
  if (u.t === "removed") {
    if (n) { if (n.tr) n.tr.remove(); nodes.delete(u.node); dirty.delete(u.node); }
    return;
  }
  if (!n) {
    if (u.t !== "state") return; // a contact of a node this page has not seen: the next snapshot has it
    n = { name: u.node, group: u.group, state: u.state, reason: "", since: 0, contact: 0, approved: true, p: null };
    n.tr = document.createElement("div");
    n.tr.className = "row";
    n.tr.dataset.name = u.node;
    $("rows").appendChild(n.tr);
    nodes.set(u.node, n);
  }
  if (u.t === "state") {
    stats.states++;
    if (u.since < n.since) { stats.older++; return; } // older than what the snapshot showed (a change made by another process)
    Object.assign(n, { group: u.group, state: u.state, reason: u.reason, since: u.since, approved: u.approved,
      at: u.at });
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
    if (!n || !n.tr) continue; // not drawn yet: its slice draws it as it is then
    n.tr.innerHTML = cells(n);
    n.tr.hidden = !visible(n);
    if (window.bootdMeasure) window.bootdDrawn.push([name, n.state, now, n.at || n.since]);
    if (name === selected) openTimeline(name);
  }
  if (dirty.size) drawCounts();
  dirty.clear();
}

function drawCounts() {
  const counts = Object.fromEntries(STATES.map((s) => [s, 0]));
  for (const n of nodes.values()) counts[n.state] = (counts[n.state] || 0) + 1;
  const active = $("f-state").value;
  $("counts").innerHTML = `<span class="count${active ? "" : " active"}" data-state=""><b>${nodes.size}</b> all</span>` +
    STATES.map((s) => `<span class="count${active === s ? " active" : ""}" data-state="${s}">` +
      `<b class="st st-${s}">${counts[s]}</b> ${s}</span>`).join("");
  let shown = 0;
  for (const n of nodes.values()) if (visible(n)) shown++;
  $("shown").textContent = `${shown} shown`;
}

function refilter() {
  fGroup = $("f-group").value;
  fState = $("f-state").value;
  for (const n of nodes.values()) if (n.tr) n.tr.hidden = !visible(n);
  drawCounts();
}

// -- the stream -------------------------------------------------------------------------------------
function setConn(cls, text) { const c = $("conn"); c.className = "conn " + cls; c.textContent = text; }

function checkSeq() {
  if (helloSeq !== null && snapSeq !== null && helloSeq > snapSeq) loadSnapshot();
}

function connect() {
  if (source) source.close();
  source = new EventSource("/status/api/events");
  source.addEventListener("hello", (e) => {
    setConn("live", "live");
    stats.hello++;
    helloSeq = JSON.parse(e.data).seq;
    // A reconnect (bootd restarted, or the stream was dropped): what happened meanwhile is unknown.
    if (stats.hello > 1 || (snapSeq === null && !inFlight)) loadSnapshot(); else checkSeq();
  });
  source.addEventListener("resync", () => { stats.resync++; loadSnapshot(); });
  source.onmessage = (e) => { stats.messages++; for (const u of JSON.parse(e.data)) apply(u); };
  source.onerror = async () => {
    stats.errors++;
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
  for (const tr of document.querySelectorAll(".row.sel")) tr.classList.remove("sel");
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
  const u = t.usage, mib = (kb) => `${Math.round(kb / 1024)} MiB`;
  if (u) {  // the node agent's last heartbeat: memory in use, its root, the RAM its root image holds
    if (u.mem_total_kb) fields.push(["memory in use", `${mib(u.mem_used_kb || 0)} of ${mib(u.mem_total_kb)}`]);
    if (u.root_size_kb) fields.push(["root in use", `${mib(u.root_used_kb || 0)} of ${mib(u.root_size_kb)}`]);
    if (u.image_ram_kb !== undefined) fields.push(["image RAM", mib(u.image_ram_kb)]);
    fields.push(["usage at", clock(u.at)]);
  }
  const inv = t.inventory;
  if (inv) {  // commissioning: what the stage one found on its last boot
    const d = inv.dmi || {};
    fields.push(["hardware", [d.vendor, d.product].filter(Boolean).join(" ") || "-"],
      ["serial", d.serial || "-"], ["asset tag", d.asset_tag || "-"],
      ["CPUs", `${inv.cpus ?? "?"} x ${inv.cpu_model || "?"}`], ["memory", `${Math.round((inv.memory_kb || 0) / 1024)} MiB`]);
    for (const nic of inv.nics || []) fields.push(["NIC", `${nic.name} ${nic.mac} ${nic.link}` +
      (nic.speed_mbps ? ` ${nic.speed_mbps} Mb/s` : "")]);
    for (const disk of inv.disks || []) fields.push(["disk", `${disk.name} ${((disk.size_bytes || 0) / 1e9).toFixed(1)} GB` +
      (disk.model ? ` ${disk.model}` : "")]);
  }
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
    boot();
  });
  $("logout").addEventListener("click", async () => { await act("/status/api/logout"); showLogin(); });
  $("rows").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-approve]");
    if (b) { e.stopPropagation(); act(`/status/api/nodes/${encodeURIComponent(b.dataset.approve)}/approve`); return; }
    const tr = e.target.closest(".row");
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
  // All at once: who we are, the stream and the snapshot (a 401 on any of them shows the login form).
  fetch("/status/api/session", { credentials: "same-origin" }).then(async (r) => {
    if (r.ok) started(await r.json()); else showLogin();
  });
  boot();
}

function boot() {
  snapSeq = helloSeq = null;
  stats.hello = 0;
  connect();
  loadSnapshot();
}

init();
