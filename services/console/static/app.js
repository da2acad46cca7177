// The twopc console page: state polled from /api/state, transaction events streamed
// from /api/events (server-sent events), purchases and faults posted to /api/*.
"use strict";

const MAX_TXNS = 300; // bounded history: the page stays responsive with thousands
const txns = new Map(); // txn id -> {el, events, status, ended}
const $ = (sel) => document.querySelector(sel);
const money = (cents) => (cents / 100).toFixed(2);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

let token = "";  // this page's session token, from /api/catalogue: required on every POST

async function post(path, body) {
  const headers = { "Content-Type": "application/json", "X-Console-Token": token };
  const r = await fetch(path, { method: "POST", headers, body: JSON.stringify(body || {}) });
  if (!r.ok) throw new Error(await r.text());
  return r.json();
}

// --- the catalogue, the form and the fault controls --------------------------------

async function setup() {
  const cat = await (await fetch("/api/catalogue")).json();
  token = cat.token;
  const buyer = $("#buyer");
  for (const a of cat.accounts) buyer.append(el("option", { value: a }, a));
  const items = $("#items");
  for (const sku of cat.skus) {
    items.append(el("label", {}, sku, el("input", { type: "number", min: 0, value: 0, name: "qty-" + sku, "data-sku": sku })));
  }
  if (cat.demo) {
    $("#demo-banner").hidden = false;
    $("#faults").hidden = false;
    const buttons = $("#fault-buttons");
    const combos = [
      ["pause", "wallet"], ["pause", "orders"],
      ["kill-after-vote", "wallet"], ["kill-after-vote", "orders"],
      ["crash-after-commit-logged", "shop"], ["drop-next-reply", "shop"],
    ];
    for (const [kind, service] of combos) {
      const b = el("button", { type: "button", title: cat.faults[kind], "data-fault": kind + ":" + service },
        `${kind.replaceAll("-", " ")}: ${service}`);
      b.addEventListener("click", async () => {
        $("#fault-result").textContent = "…";
        try { $("#fault-result").textContent = (await post("/api/fault", { kind, service })).done; }
        catch (e) { $("#fault-result").textContent = "refused: " + e.message; }
      });
      buttons.append(b);
    }
  }
  $("#buy").addEventListener("submit", buy);
  $("#check").addEventListener("click", check);
}

async function buy(ev) {
  ev.preventDefault();
  const items = {};
  for (const input of document.querySelectorAll("#items input")) {
    const q = parseInt(input.value, 10);
    if (q > 0) items[input.dataset.sku] = q;
  }
  const result = $("#result");
  result.replaceChildren(el("span", { class: "pending" }, "sending…"));
  try {
    const r = await post("/api/purchase", { account: $("#buyer").value, items });
    const branches = (r.branches || []).map((b) =>
      el("div", { class: "branch", "data-branch": b.name }, `${b.name}: `, el("span", { class: "vote" }, b.vote),
        b.reason ? ` (${b.reason})` : ""));
    result.replaceChildren(
      el("div", {}, el("span", { class: "outcome " + r.outcome, "data-outcome": r.outcome }, r.outcome),
        r.amount ? ` · ${money(r.amount)}` : "", r.txn_id ? " · txn " : "",
        r.txn_id ? el("code", { class: "txn-id" }, r.txn_id) : ""),
      ...branches,
      r.reason ? el("div", { class: "reason" }, "why: " + r.reason) : "");
    if (r.txn_id) result.dataset.txn = r.txn_id;
  } catch (e) {
    result.replaceChildren(el("span", { class: "bad" }, "refused: " + e.message));
  }
  refresh();
}

async function check() {
  const out = $("#invariants");
  out.textContent = "checking…";
  const r = await post("/api/invariants");
  out.replaceChildren(
    el("div", { class: r.ok ? "ok" : "bad", "data-ok": String(r.ok) }, r.ok ? "OK: atomic, conserved, nothing in doubt" : "VIOLATED"),
    el("div", {}, "money: " + r.money), el("div", {}, "stock: " + r.stock),
    el("div", {}, `${r.committed} committed, ${r.in_doubt} in doubt`),
    ...r.violations.map((v) => el("div", { class: "bad" }, v)),
    ...r.heuristic.map((h) => el("div", { class: "wait" }, "heuristic: " + h)));
}

// --- state, polled -------------------------------------------------------------------

async function refresh() {
  let s;
  try { s = await (await fetch("/api/state")).json(); } catch { return; }
  $("#buyers tbody").replaceChildren(...s.buyers.map((b) => b.error
    ? el("tr", { "data-account": b.account }, el("td", {}, b.account), el("td", { class: "down", colSpan: 3 }, b.error))
    : el("tr", { "data-account": b.account, "data-balance": b.balance, "data-held": b.held },
        el("td", {}, b.account), el("td", { class: "balance" }, money(b.balance)),
        el("td", { class: "held" }, money(b.held)), el("td", {}, money(b.available)))));
  $("#products tbody").replaceChildren(...s.products.map((p) => p.error
    ? el("tr", { "data-sku": p.sku }, el("td", {}, p.sku), el("td", { class: "down", colSpan: 4 }, p.error))
    : el("tr", { "data-sku": p.sku, "data-on-hand": p.on_hand, "data-reserved": p.reserved },
        el("td", {}, p.sku), el("td", {}, money(p.price)), el("td", { class: "on-hand" }, p.on_hand),
        el("td", { class: "reserved" }, p.reserved), el("td", {}, p.sold))));
  $("#services").replaceChildren(...Object.entries(s.services).map(([name, v]) =>
    el("li", { "data-service": name }, el("b", {}, name), " ", el("span", { class: "addr" }, v.address), " ",
      el("span", { class: v.running ? "ok" : "down" }, v.running ? "running" : "down"))));
  const doubt = [];
  for (const [name, list] of Object.entries(s.in_doubt)) {
    for (const t of list) doubt.push(el("div", { class: "wait", "data-in-doubt": t.txn_id }, `${name}: ${short(t.txn_id)} prepared ${t.age_s}s ago`));
  }
  $("#in-doubt").replaceChildren(...(doubt.length ? doubt : [el("div", { class: "ok" }, "nothing in doubt")]));
}

// --- transaction events, streamed ------------------------------------------------------

const short = (id) => (id.includes(":") ? id.split(":")[1] : id).slice(0, 8);

function describe(e) {
  const bits = [e.kind.replaceAll("_", " ")];
  if (e.branch || e.target) bits.push(e.branch || e.target);
  if (e.vote) bits.push("vote " + e.vote);
  if (e.outcome) bits.push(e.outcome);
  if (e.attempt) bits.push("attempt " + e.attempt);
  if (e.reason) bits.push("(" + e.reason + ")");
  if (e.duration_s) bits.push(`+${(e.duration_s * 1000).toFixed(1)} ms`);
  return bits.join(" ");
}

function status(t) {
  if (t.ended) return t.outcome || "ended";
  if (t.outcome) return t.outcome === "committed" ? "committed, phase 2" : "aborted, phase 2";
  return "phase 1";
}

function onEvent(e) {
  if (e.source === "console") {
    const notes = $("#notes");
    notes.prepend(el("li", { "data-note": e.kind + ":" + e.service }, `${new Date(e.at * 1000).toLocaleTimeString()} ${e.service} ${e.kind} ${e.reason || ""}`));
    while (notes.children.length > 50) notes.lastChild.remove();
    for (const t of txns.values()) if (!t.ended) addLine(t, e.at, "console", `${e.service} ${e.kind}`);
    refresh();
    return;
  }
  if (!e.txn_id) return; // in-doubt scans: shown by the state panel
  let t = txns.get(e.txn_id);
  if (!t) {
    const head = el("div", { class: "head" }, el("span", { class: "status" }), el("code", { class: "id" }, e.txn_id), el("span", { class: "branches" }));
    const li = el("li", { class: "collapsed", "data-txn": e.txn_id }, head, el("ol", { class: "timeline" }));
    head.addEventListener("click", () => li.classList.toggle("collapsed"));
    t = { el: li, outcome: null, ended: false };
    txns.set(e.txn_id, t);
    $("#txns").prepend(li);
    while (txns.size > MAX_TXNS) { const [id, old] = txns.entries().next().value; old.el.remove(); txns.delete(id); }
  }
  if (e.source === "shop") {
    if (e.kind === "decided") t.outcome = e.outcome;
    if (e.kind === "ended") t.ended = true;
    if (e.kind === "phase1_started" || e.kind === "recovering") t.el.querySelector(".branches").textContent = e.branches.join(" + ");
  }
  addLine(t, e.at, e.source, describe(e));
  const st = status(t);
  const s = t.el.querySelector(".status");
  s.textContent = st;
  s.className = "status " + (t.outcome || "phase1");
  t.el.dataset.status = t.outcome || "phase1";
  t.el.dataset.ended = String(t.ended);
}

function addLine(t, at, source, text) {
  // Each service's events arrive from its own file: keep the timeline in time order.
  const timeline = t.el.querySelector(".timeline");
  const line = el("li", { "data-at": at }, `${new Date(at * 1000).toLocaleTimeString()} `, el("span", { class: "src" }, source), " " + text);
  const later = [...timeline.children].find((c) => parseFloat(c.dataset.at) > at);
  timeline.insertBefore(line, later || null);
}

function stream() {
  const es = new EventSource("/api/events");
  es.onmessage = (m) => onEvent(JSON.parse(m.data));
}

setup().then(() => { refresh(); stream(); setInterval(refresh, 1000); });
