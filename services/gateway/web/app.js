// The tidings web client: plain JavaScript, no build step, the public protocol only
// (protobuf frames over the WebSocket at /v1/ws, proto.js). Every text a user wrote is put
// into the page with textContent, never as HTML; the server's Content-Security-Policy
// forbids inline scripts besides.
"use strict";

const P = window.TidingsProto;
const $ = (id) => document.getElementById(id);

const PAGE = 50; // events per History page and per conversation in Sync
const MAX_GAP_PULL = 1000; // a larger gap after a reconnect resets the view to the newest
const TYPING_EVERY_MS = 3000; // at most one Typing a conversation this often
const TYPING_SHOWN_MS = 5000;
const REQUEST_TIMEOUT_MS = 15000;
const RECONNECT_MAX_MS = 10000;
// Close codes after which reconnecting with the same token cannot help.
const FINAL_CLOSE = new Set([4001, 4002, 4011]);

const OPS = ["hello", "send", "sync", "history", "pull", "mark_read", "typing",
  "create_conversation", "add_member", "remove_member", "list_conversations", "list_members",
  "ping"];
const MSGS = ["welcome", "send_ack", "event", "sync_result", "events", "read_cursor", "typing",
  "committed", "conversation_list", "member_list", "error", "pong", "goodbye"];
const BODIES = ["message_posted", "message_edited", "message_recalled", "reaction_added",
  "reaction_removed", "member_joined", "member_left", "conversation_created",
  "conversation_renamed"];

const app = {
  token: null,
  ws: null,
  me: null,
  nextId: 1,
  pending: new Map(), // request_id -> {resolve, reject, timer}
  convs: new Map(), // conversation id -> Conv
  selected: null,
  reconnectMs: 500,
  lastTyping: new Map(),
  typingTimers: new Map(),
  signedOut: true,
  editing: null, // {conv, seq, input}: the edit in progress survives re-rendering
  // Timings the browser tests and the benchmark read (ms since navigation start).
  timings: {},
};
window.tidings = app;

class Conv {
  constructor(id) {
    this.id = id;
    this.events = new Map(); // seq -> event
    this.head = 0;
    this.read = 0;
    this.unread = 0;
    this.oldest = 0; // lowest seq held (0: none)
    this.last = 0; // highest seq held contiguously from `oldest`
    this.members = null;
    this.chain = Promise.resolve(); // live events of this conversation, one after another
  }
  add(e) {
    this.events.set(e.seq, e);
    if (!this.oldest || e.seq < this.oldest) this.oldest = e.seq;
    if (e.seq > this.last) this.last = e.seq;
    if (e.seq > this.head) this.head = e.seq;
  }
}

// ---- the connection ----

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return scheme + "//" + location.host + "/v1/ws";
}

function request(op, body) {
  const ws = app.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) {
    return Promise.reject(new Error("not connected"));
  }
  const id = app.nextId++;
  const frame = { request_id: id };
  frame[op] = body;
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      app.pending.delete(id);
      reject(new Error(op + ": no answer in time"));
    }, REQUEST_TIMEOUT_MS);
    app.pending.set(id, { resolve, reject, timer });
    ws.send(P.encode("ClientFrame", frame));
  });
}

function failAll(why) {
  for (const { reject, timer } of app.pending.values()) {
    clearTimeout(timer);
    reject(new Error(why));
  }
  app.pending.clear();
}

function status(state, text) {
  const el = $("status");
  el.dataset.state = state;
  el.textContent = text;
}

function connect() {
  const ws = new WebSocket(wsUrl());
  ws.binaryType = "arraybuffer";
  app.ws = ws;
  status("connecting", "connecting…");
  ws.onopen = () => start(ws).catch((e) => {
    if (app.ws !== ws) return;
    if (e.code === "WRONG_CELL" && e.redirect) {
      // The tenant is served by another cell: its own web client, where one signs in there
      // (this page may only talk to its own origin).
      const there = new URL("/app/", e.redirect.replace(/^ws/, "http"));
      app.signedOut = true;
      ws.close();
      showSigninError("your organisation is served at " + there.origin + "; opening it…");
      location.assign(there.href);
      return;
    }
    showSigninError(e.message);
    ws.close();
  });
  ws.onmessage = (m) => {
    let frame;
    try {
      frame = P.decode("ServerFrame", new Uint8Array(m.data));
    } catch (e) {
      console.warn("undecodable frame", e);
      return;
    }
    const kind = P.which(frame, MSGS);
    const waiting = frame.request_id && app.pending.get(frame.request_id);
    if (waiting) {
      app.pending.delete(frame.request_id);
      clearTimeout(waiting.timer);
      if (kind === "error") {
        const err = new Error(frame.error.message || P.ERROR_CODES[frame.error.code]);
        err.code = P.ERROR_CODES[frame.error.code];
        err.redirect = frame.error.redirect_url || "";
        waiting.reject(err);
      } else {
        waiting.resolve(frame[kind]);
      }
      return;
    }
    push(kind, frame[kind]);
  };
  ws.onclose = (e) => {
    if (app.ws !== ws) return;
    app.ws = null;
    failAll("connection closed");
    if (app.signedOut) return;
    if (FINAL_CLOSE.has(e.code)) {
      signOut("signed out by the server: " + (e.reason || e.code));
      return;
    }
    status("reconnecting", "reconnecting…");
    const delay = app.reconnectMs * (0.5 + Math.random() / 2);
    app.reconnectMs = Math.min(app.reconnectMs * 2, RECONNECT_MAX_MS);
    setTimeout(() => { if (!app.signedOut) connect(); }, delay);
  };
}

async function start(ws) {
  const welcome = await request("hello", { token: app.token, device: "web" });
  if (app.ws !== ws) return;
  app.me = welcome.user;
  app.reconnectMs = 500;
  $("whoami").textContent = welcome.user + " @ " + welcome.tenant;
  $("signin").hidden = true;
  $("chat").hidden = false;
  $("signout").hidden = false;
  status("connected", "connected");
  await sync();
  if (!app.timings.conversations) app.timings.conversations = performance.now();
  if (!app.selected && app.convs.size) select([...app.convs.keys()].sort()[0]);
  else if (app.selected) renderMessages();
}

// Catch up: every conversation, with the events after what we hold.
async function sync() {
  const known = [...app.convs.values()].filter((c) => c.last).map((c) => ({
    conversation: c.id, last_seq: c.last,
  }));
  let cursor = "";
  do {
    const r = await request("sync", { known, latest: PAGE, cursor });
    for (const s of r.conversations) await applyState(s);
    cursor = r.next_cursor;
  } while (cursor);
  renderConvs();
}

async function applyState(s) {
  let c = app.convs.get(s.conversation);
  if (!c) {
    c = new Conv(s.conversation);
    app.convs.set(c.id, c);
  }
  if (s.error) return; // unreadable right now; the next Sync tries again
  const hadEvents = c.last > 0;
  const first = s.events.length ? s.events[0].seq : 0;
  if (hadEvents && s.truncated && first > c.last + 1) {
    if (first - c.last - 1 <= MAX_GAP_PULL) {
      await pullRange(c, c.last + 1, first - 1);
    } else {
      // Too far behind: start again from the newest; older pages come with History.
      c.events.clear();
      c.oldest = 0;
      c.last = 0;
    }
  }
  for (const e of s.events) c.add(e);
  c.head = Math.max(c.head, s.head_seq);
  if (!c.last) c.last = c.head; // nothing held: the newest page starts at the head
  c.read = s.read_seq;
  c.unread = s.unread;
  if (c.id === app.selected) markRead(c);
}

async function pullRange(c, from, to) {
  while (from <= to) {
    const r = await request("pull", { conversation: c.id, from_seq: from, to_seq: to });
    if (!r.events.length) break;
    for (const e of r.events) c.add(e);
    from = r.events[r.events.length - 1].seq + 1;
  }
}

// ---- pushes ----

function push(kind, body) {
  switch (kind) {
    case "event": {
      let c = app.convs.get(body.conversation);
      if (!c) {
        c = new Conv(body.conversation);
        app.convs.set(c.id, c);
      }
      c.chain = c.chain.then(() => liveEvent(c, body)).catch((e) => console.warn(e));
      break;
    }
    case "read_cursor": {
      const c = app.convs.get(body.conversation);
      if (c && body.read_seq > c.read) {
        c.read = body.read_seq;
        if (c.read >= c.head) c.unread = 0;
        renderConvs();
      }
      break;
    }
    case "typing":
      showTyping(body.conversation, body.user);
      break;
    case "goodbye":
      status("reconnecting", body.message || "closed by the server");
      break;
    default:
      break;
  }
}

async function liveEvent(c, e) {
  if (c.events.has(e.seq) || (c.last && e.seq <= c.last && e.seq >= c.oldest)) return;
  if (c.last && e.seq > c.last + 1) await pullRange(c, c.last + 1, e.seq - 1);
  c.add(e);
  const posted = e.message_posted !== undefined;
  if (c.id === app.selected && document.visibilityState !== "hidden") {
    markRead(c);
  } else if (posted && e.sender !== app.me) {
    c.unread += 1;
  }
  if (e.sender && e.sender !== app.me) clearTyping(c.id, e.sender);
  if (e.member_joined || e.member_left) c.members = null;
  renderConvs();
  if (c.id === app.selected) {
    if (!c.members) loadMembers(c);
    renderMessages(true);
  }
}

// ---- conversations ----

function select(id) {
  app.selected = id;
  const c = app.convs.get(id);
  $("conv-title").textContent = id;
  $("compose").disabled = false;
  $("send").disabled = false;
  markRead(c);
  renderConvs();
  renderMessages(true);
  loadMembers(c);
  if (c.events.size < PAGE && c.oldest !== 1) older();
}

function markRead(c) {
  if (c.head > c.read) {
    c.read = c.head;
    request("mark_read", { conversation: c.id, seq: c.head }).catch(() => {});
  }
  c.unread = 0;
}

async function older() {
  const c = app.convs.get(app.selected);
  if (!c) return;
  const before = c.oldest || c.head + 1;
  if (before <= 1) return;
  const button = $("older");
  button.disabled = true;
  try {
    const r = await request("history", { conversation: c.id, before_seq: before, limit: PAGE });
    for (const e of r.events) c.add(e);
    if (!r.events.length) c.oldest = 1;
    renderMessages(false);
  } catch (e) {
    status("connected", "could not load older messages: " + e.message);
  } finally {
    button.disabled = false;
  }
}

async function loadMembers(c) {
  const members = [];
  let after = "";
  for (let page = 0; page < 20; page++) {
    let r;
    try {
      r = await request("list_members", { conversation: c.id, after, limit: 500 });
    } catch (e) {
      return;
    }
    members.push(...r.members.map((m) => m.user));
    if (!r.more || !r.members.length) break;
    after = r.members[r.members.length - 1].user;
  }
  c.members = members;
  if (c.id === app.selected) renderMembers(c);
}

// ---- rendering (text only: textContent everywhere) ----

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderConvs() {
  const list = $("convs");
  list.replaceChildren();
  for (const id of [...app.convs.keys()].sort()) {
    const c = app.convs.get(id);
    const li = el("li", id === app.selected ? "selected" : "");
    li.dataset.conv = id;
    li.append(el("span", "name", id), el("span", "unread", c.unread ? String(c.unread) : ""));
    li.addEventListener("click", () => select(id));
    list.append(li);
  }
}

function renderMembers(c) {
  const list = $("members");
  list.replaceChildren();
  for (const m of c.members || []) list.append(el("li", "member", m));
}

// The messages as they read now: posts with their edits, recalls and reactions applied.
function view(c) {
  const seqs = [...c.events.keys()].sort((a, b) => a - b);
  const shown = new Map();
  const rows = [];
  for (const seq of seqs) {
    const e = c.events.get(seq);
    const body = P.which(e, BODIES);
    if (body === "message_posted") {
      const row = { e, text: e.message_posted.text, mentions: e.message_posted.mentions,
        edited: false, recalled: false, reactions: new Map() };
      shown.set(seq, row);
      rows.push(row);
    } else if (body === "message_edited" || body === "message_recalled" ||
      body === "reaction_added" || body === "reaction_removed") {
      const row = shown.get(e[body].target_seq);
      if (!row) continue; // its message is older than what is loaded
      if (body === "message_edited") {
        row.text = e.message_edited.new_text;
        row.edited = true;
      } else if (body === "message_recalled") {
        row.recalled = true;
      } else {
        const who = row.reactions.get(e[body].reaction) || new Set();
        if (body === "reaction_added") who.add(e.sender); else who.delete(e.sender);
        row.reactions.set(e[body].reaction, who);
      }
    } else if (body) {
      rows.push({ e, system: describe(e, body) });
    }
  }
  return rows;
}

function describe(e, body) {
  switch (body) {
    case "member_joined": return e.member_joined.user + " joined";
    case "member_left": return e.member_left.user + " left";
    case "conversation_created": return e.sender + " created the conversation";
    case "conversation_renamed": return e.sender + " renamed it to " + e.conversation_renamed.title;
    default: return body;
  }
}

function renderMessages(toBottom) {
  const c = app.convs.get(app.selected);
  const list = $("messages");
  const fromBottom = list.scrollHeight - list.scrollTop;
  list.replaceChildren();
  if (!c) return;
  $("older").hidden = !(c.oldest > 1 || (!c.oldest && c.head > 0));
  for (const row of view(c)) {
    const li = el("li", "msg");
    li.dataset.seq = String(row.e.seq);
    if (row.system) {
      li.classList.add("system");
      li.append(el("span", "text", row.system));
      list.append(li);
      continue;
    }
    li.append(el("span", "sender", row.e.sender));
    const ed = app.editing;
    const text = ed && ed.conv === c.id && ed.seq === row.e.seq && !row.recalled ? ed.form
      : el("span", "text", row.recalled ? "message recalled" : row.text);
    if (row.recalled) li.classList.add("recalled");
    if (!row.recalled && row.mentions.includes(app.me)) li.classList.add("mention");
    li.append(text);
    const time = new Date(row.e.server_time_ms).toLocaleTimeString();
    li.append(el("span", "meta", time + (row.edited && !row.recalled ? " (edited)" : "")));
    if (!row.recalled) li.append(actions(c, row));
    const reactions = el("span", "reactions");
    for (const [reaction, who] of row.recalled ? [] : row.reactions) {
      if (!who.size) continue;
      const b = el("button", "reaction", reaction + " " + who.size);
      b.type = "button";
      b.dataset.reaction = reaction;
      b.addEventListener("click", () => react(c, row.e.seq, reaction, who.has(app.me)));
      reactions.append(b);
    }
    li.append(reactions);
    list.append(li);
  }
  if (!app.timings.firstPage && list.querySelector(".msg:not(.system)")) {
    app.timings.firstPage = performance.now();
  }
  list.scrollTop = toBottom ? list.scrollHeight : list.scrollHeight - fromBottom;
}

function actions(c, row) {
  const span = el("span", "actions");
  const button = (cls, label, fn) => {
    const b = el("button", cls, label);
    b.type = "button";
    b.addEventListener("click", fn);
    span.append(b);
  };
  const mine = row.reactions.get("👍");
  button("react", "👍", () => react(c, row.e.seq, "👍", !!(mine && mine.has(app.me))));
  if (row.e.sender === app.me) {
    button("edit", "edit", () => startEdit(c, row));
    button("recall", "recall", () => send(c, { message_recalled: { target_seq: row.e.seq } }));
  }
  return span;
}

function startEdit(c, row) {
  const input = el("input", "edit-input");
  input.value = row.text;
  const form = el("form", "edit-form");
  form.append(input);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    app.editing = null;
    if (input.value && input.value !== row.text) {
      send(c, { message_edited: { target_seq: row.e.seq, new_text: input.value } });
    }
    renderMessages(false);
  });
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") { app.editing = null; renderMessages(false); }
  });
  app.editing = { conv: c.id, seq: row.e.seq, form };
  renderMessages(false);
  input.focus();
}

function react(c, seq, reaction, remove) {
  const body = remove ? { reaction_removed: { target_seq: seq, reaction } }
    : { reaction_added: { target_seq: seq, reaction } };
  send(c, body);
}

async function send(c, body) {
  const frame = Object.assign({ client_msg_id: crypto.randomUUID(), conversation: c.id }, body);
  try {
    await request("send", frame);
  } catch (e) {
    status("connected", "not sent: " + e.message);
  }
}

// ---- typing ----

function showTyping(conv, user) {
  if (user === app.me) return;
  const key = conv + "\u0000" + user;
  clearTimeout(app.typingTimers.get(key));
  app.typingTimers.set(key, setTimeout(() => clearTyping(conv, user), TYPING_SHOWN_MS));
  renderTyping();
}

function clearTyping(conv, user) {
  const key = conv + "\u0000" + user;
  clearTimeout(app.typingTimers.get(key));
  if (app.typingTimers.delete(key)) renderTyping();
}

function renderTyping() {
  const who = [...app.typingTimers.keys()]
    .map((k) => k.split("\u0000"))
    .filter(([conv]) => conv === app.selected)
    .map(([, user]) => user);
  $("typing").textContent = who.length ? who.join(", ") + (who.length > 1 ? " are" : " is") + " typing…" : "";
}

// ---- composing, with @-completion ----

function mentionPrefix() {
  const input = $("compose");
  const before = input.value.slice(0, input.selectionStart);
  const m = /(^|\s)@([A-Za-z0-9_-]*)$/.exec(before);
  return m ? m[2] : null;
}

function renderMentions() {
  const box = $("mentions");
  box.replaceChildren();
  const c = app.convs.get(app.selected);
  const prefix = mentionPrefix();
  if (prefix === null || !c || !c.members) {
    box.hidden = true;
    return;
  }
  const matches = c.members.filter((m) => m.startsWith(prefix) && m !== app.me).slice(0, 8);
  for (const [i, m] of matches.entries()) {
    const b = el("button", i === 0 ? "active" : "", m);
    b.type = "button";
    b.dataset.user = m;
    b.addEventListener("mousedown", (ev) => { ev.preventDefault(); complete(m); });
    box.append(b);
  }
  box.hidden = matches.length === 0;
}

function complete(user) {
  const input = $("compose");
  const at = input.selectionStart;
  const before = input.value.slice(0, at).replace(/@([A-Za-z0-9_-]*)$/, "@" + user + " ");
  input.value = before + input.value.slice(at);
  input.setSelectionRange(before.length, before.length);
  renderMentions();
}

function onCompose() {
  renderMentions();
  const conv = app.selected;
  const now = Date.now();
  if (conv && now - (app.lastTyping.get(conv) || 0) > TYPING_EVERY_MS) {
    app.lastTyping.set(conv, now);
    request("typing", { conversation: conv }).catch(() => {});
  }
}

function onComposeKey(ev) {
  const box = $("mentions");
  if (box.hidden || (ev.key !== "Tab" && ev.key !== "Enter")) return;
  const active = box.querySelector("button.active");
  if (active) {
    ev.preventDefault();
    complete(active.dataset.user);
  }
}

function submitMessage(ev) {
  ev.preventDefault();
  const c = app.convs.get(app.selected);
  const input = $("compose");
  const text = input.value.trim();
  if (!c || !text) return;
  const members = new Set(c.members || []);
  const mentions = [...new Set([...text.matchAll(/(^|\s)@([A-Za-z0-9_-]+)/g).map((m) => m[2])])]
    .filter((u) => members.has(u));
  input.value = "";
  $("mentions").hidden = true;
  app.lastTyping.delete(c.id);
  send(c, { message_posted: { text, mentions } });
}

// ---- signing in and out ----

function showSigninError(text) {
  $("signin-error").textContent = text;
}

function signIn(token) {
  app.token = token.trim();
  if (!app.token) return;
  app.signedOut = false;
  app.timings.signIn = performance.now();
  sessionStorage.setItem("tidings-token", app.token);
  showSigninError("");
  connect();
}

function signOut(why) {
  app.signedOut = true;
  sessionStorage.removeItem("tidings-token");
  if (app.ws) app.ws.close();
  app.convs.clear();
  app.selected = null;
  $("chat").hidden = true;
  $("signout").hidden = true;
  $("signin").hidden = false;
  status("signed-out", "signed out");
  showSigninError(why);
}

async function devSignIn(ev) {
  ev.preventDefault();
  const q = new URLSearchParams({ tenant: $("dev-tenant").value, user: $("dev-user").value });
  const r = await fetch("/app/dev-token?" + q, { method: "POST" });
  if (!r.ok) {
    showSigninError("development sign-in refused: " + (await r.text()));
    return;
  }
  signIn((await r.json()).token);
}

// The development form shows only when the server issues development tokens (it answers
// 400 to a request without a user then, 404 otherwise).
async function probeDevMode() {
  try {
    const r = await fetch("/app/dev-token", { method: "POST" });
    $("dev-form").hidden = r.status === 404;
  } catch (e) {
    $("dev-form").hidden = true;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (ev) => { ev.preventDefault(); signIn($("token").value); });
  $("dev-form").addEventListener("submit", (ev) => devSignIn(ev).catch((e) => showSigninError(e.message)));
  $("composer").addEventListener("submit", submitMessage);
  $("compose").addEventListener("input", onCompose);
  $("compose").addEventListener("keydown", onComposeKey);
  $("older").addEventListener("click", older);
  $("signout").addEventListener("click", () => signOut(""));
  document.addEventListener("visibilitychange", () => {
    const c = app.convs.get(app.selected);
    if (c && document.visibilityState === "visible") { markRead(c); renderConvs(); }
  });
  probeDevMode();
  const saved = sessionStorage.getItem("tidings-token");
  if (saved) signIn(saved);
});
