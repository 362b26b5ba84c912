// The compliance console: plain JavaScript over the admin listener's JSON API
// (docs/admin.md). Every answer is rendered with textContent; the token stays in this
// tab's memory only (never stored, never in a URL).
"use strict";

const $ = (id) => document.getElementById(id);
let token = "";

function auth() {
  return { Authorization: "Bearer " + token };
}

// JSON lines; the last one says whether the answer is complete.
async function lines(response) {
  const text = await response.text();
  if (!response.ok) {
    let message = text;
    try { message = JSON.parse(text).error.message; } catch (e) { /* plain text */ }
    throw new Error(response.status + ": " + message);
  }
  const rows = text.split("\n").filter((l) => l).map((l) => JSON.parse(l));
  const last = rows.pop() || {};
  if (last.error) throw new Error("failed midway: " + last.error.message);
  if (!last.complete) throw new Error("the answer was cut short");
  return { rows, last, text };
}

function cell(tr, text) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  tr.append(td);
  return td;
}

function status(id, text, error) {
  const el = $(id);
  el.textContent = text;
  el.className = error ? "error" : "";
}

function filters() {
  const q = new URLSearchParams();
  for (const [name, id] of [["text", "q-text"], ["conv", "q-conv"], ["sender", "q-sender"],
    ["from", "q-from"], ["to", "q-to"]]) {
    const v = $(id).value.trim();
    if (v) q.set(name, v);
  }
  return q;
}

function fate(hit) {
  const parts = [];
  for (const e of hit.edits || []) parts.push("edited at " + e.time + " to: " + e.text);
  if (hit.recalled) parts.push("recalled at " + hit.recalled.time + " by " + hit.recalled.by);
  return parts.join("\n");
}

async function search(ev) {
  ev.preventDefault();
  status("search-status", "searching…");
  try {
    const { rows, last } = await lines(await fetch("/v1/compliance/search?" + filters(), { headers: auth() }));
    const body = $("hits").tBodies[0];
    body.replaceChildren();
    for (const hit of rows) {
      const tr = document.createElement("tr");
      tr.className = "hit";
      for (const v of [hit.time, hit.conversation, hit.seq, hit.sender, hit.text, fate(hit), hit.tier]) {
        cell(tr, v);
      }
      body.append(tr);
    }
    status("search-status", last.rows + " found (complete)");
  } catch (e) {
    status("search-status", e.message, true);
  }
}

// JSON lines stream and end with a line saying whether they are complete; CSV and Parquet
// are written whole on the server first, so a 200 with the full Content-Length is complete.
async function exportHits() {
  status("search-status", "exporting…");
  const format = $("export-format").value;
  try {
    const query = filters();
    query.set("format", format);
    const response = await fetch("/v1/compliance/export?" + query, { headers: auth() });
    let blob, rows;
    if (format === "jsonl") {
      const { last, text } = await lines(response);
      blob = new Blob([text], { type: "application/x-ndjson" });
      rows = last.rows;
    } else {
      if (!response.ok) await lines(response); // throws with the server's message
      blob = await response.blob();
      rows = response.headers.get("x-tidings-rows");
    }
    const link = $("download");
    if (link.href) URL.revokeObjectURL(link.href);
    link.href = URL.createObjectURL(blob);
    link.download = "tidings-export." + format;
    link.hidden = false;
    status("search-status", "exported " + rows + " (recorded in the audit log)");
  } catch (e) {
    status("search-status", e.message, true);
  }
}

async function loadAudit() {
  status("audit-status", "reading…");
  try {
    const { rows, last } = await lines(await fetch("/v1/compliance/audit", { headers: auth() }));
    const body = $("audit-log").tBodies[0];
    body.replaceChildren();
    for (const r of rows) {
      const tr = document.createElement("tr");
      tr.className = "record";
      tr.dataset.action = r.action;
      for (const v of [r.seq, r.time, r.actor, r.via, r.action, r.outcome, r.rows,
        r.filters === null ? "" : JSON.stringify(r.filters)]) {
        cell(tr, v);
      }
      body.append(tr);
    }
    const problems = (last.problems || []).length;
    status("audit-status", last.rows + " records" + (problems ? ", " + problems + " PROBLEMS" : ", chain intact"), problems > 0);
  } catch (e) {
    status("audit-status", e.message, true);
  }
}

async function loadHolds() {
  try {
    const { rows } = await lines(await fetch("/v1/compliance/holds", { headers: auth() }));
    const body = $("holds").tBodies[0];
    body.replaceChildren();
    for (const h of rows) {
      const tr = document.createElement("tr");
      tr.className = "hold";
      for (const v of [h.id, h.scope, h.target, h.reason, h.created_by, h.active ? "active" : "released"]) {
        cell(tr, v);
      }
      const td = cell(tr, "");
      if (h.active) {
        const b = document.createElement("button");
        b.type = "button";
        b.className = "release";
        b.textContent = "release";
        b.addEventListener("click", () => hold("/v1/compliance/holds/release", { id: h.id }));
        td.append(b);
      }
      body.append(tr);
    }
  } catch (e) {
    status("hold-status", e.message, true);
  }
}

async function hold(path, body) {
  try {
    const response = await fetch(path, {
      method: "POST",
      headers: Object.assign({ "Content-Type": "application/json" }, auth()),
      body: JSON.stringify(body),
    });
    const text = await response.text();
    if (!response.ok) throw new Error(response.status + ": " + text);
    status("hold-status", "done: " + JSON.parse(text).id);
  } catch (e) {
    status("hold-status", e.message, true);
  }
  await loadHolds();
}

function placeHold(ev) {
  ev.preventDefault();
  const body = { reason: $("h-reason").value };
  if ($("h-conv").value.trim()) body.conv = $("h-conv").value.trim();
  if ($("h-user").value.trim()) body.user = $("h-user").value.trim();
  hold("/v1/compliance/holds", body);
}

// An admin operation: its JSON answer shown as text.
async function operation(path, body) {
  const out = $("op-result");
  out.className = "";
  out.textContent = "running…";
  try {
    const response = await fetch(path, {
      method: "POST",
      headers: Object.assign({ "Content-Type": "application/json" }, auth()),
      body: JSON.stringify(body || {}),
    });
    const text = await response.text();
    if (!response.ok) throw new Error(response.status + ": " + text);
    out.textContent = JSON.stringify(JSON.parse(text), null, 2);
  } catch (e) {
    out.textContent = e.message;
    out.className = "error";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("op-rotate").addEventListener("click", () => operation("/v1/admin/keys/rotate"));
  $("op-wrap").addEventListener("click", () => operation("/v1/admin/keys/wrap"));
  $("op-archive-run").addEventListener("click", () => operation("/v1/admin/archive/run"));
  $("op-archive-verify").addEventListener("click", () => operation("/v1/admin/archive/verify"));
  $("shred-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    // The server checks the confirmation too: the tenant named twice, or nothing happens.
    operation("/v1/admin/keys/shred", { confirm: $("shred-confirm").value.trim() });
  });
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("token").value.trim();
    if (!token) return;
    $("signin").hidden = true;
    $("console").hidden = false;
    loadHolds();
  });
  $("search-form").addEventListener("submit", search);
  $("export").addEventListener("click", exportHits);
  $("audit").addEventListener("click", loadAudit);
  $("hold-form").addEventListener("submit", placeHold);
});
