// A small protobuf codec for the messages of schemas/proto/tidings/client/v1/client.proto
// and tidings/v1/events.proto: the web client speaks the public protocol, like any client.
//
// Messages are plain objects with the .proto field names (snake_case). A field absent or at
// its default is not written, except message fields (a oneof member such as `ping: {}` is
// written even when empty). Numbers are JavaScript numbers: seqs and times stay far below
// 2^53. Unknown fields are skipped on decoding, as protobuf requires.
"use strict";

// Field number -> [name, type]; a type starting with '*' is repeated. Scalar types: str,
// u64, u32, i64, bool, enum; any other name is a message of this table.
const SCHEMA = {
  ClientFrame: {
    1: ["request_id", "u64"], 10: ["hello", "Hello"], 11: ["send", "Send"],
    12: ["sync", "Sync"], 13: ["history", "History"], 14: ["pull", "Pull"],
    15: ["mark_read", "MarkRead"], 16: ["typing", "Typing"],
    17: ["create_conversation", "CreateConversation"], 18: ["add_member", "AddMember"],
    19: ["remove_member", "RemoveMember"], 20: ["list_conversations", "ListConversations"],
    21: ["list_members", "ListMembers"], 22: ["ping", "Ping"],
  },
  Hello: { 1: ["token", "str"], 2: ["device", "str"] },
  Send: {
    1: ["client_msg_id", "str"], 2: ["conversation", "str"],
    10: ["message_posted", "MessagePosted"], 11: ["message_edited", "MessageEdited"],
    12: ["message_recalled", "MessageRecalled"], 13: ["reaction_added", "ReactionAdded"],
    14: ["reaction_removed", "ReactionRemoved"],
  },
  KnownConversation: { 1: ["conversation", "str"], 2: ["last_seq", "u64"] },
  Sync: {
    1: ["known", "*KnownConversation"], 2: ["latest", "u32"], 3: ["cursor", "str"],
    4: ["max_conversations", "u32"],
  },
  History: { 1: ["conversation", "str"], 2: ["before_seq", "u64"], 3: ["limit", "u32"] },
  Pull: { 1: ["conversation", "str"], 2: ["from_seq", "u64"], 3: ["to_seq", "u64"] },
  MarkRead: { 1: ["conversation", "str"], 2: ["seq", "u64"] },
  Typing: { 1: ["conversation", "str"] },
  CreateConversation: {
    1: ["conversation", "str"], 2: ["kind", "enum"], 3: ["title", "str"], 4: ["members", "*str"],
  },
  AddMember: { 1: ["conversation", "str"], 2: ["user", "str"] },
  RemoveMember: { 1: ["conversation", "str"], 2: ["user", "str"] },
  ListConversations: { 1: ["after", "str"], 2: ["limit", "u32"] },
  ListMembers: { 1: ["conversation", "str"], 2: ["after", "str"], 3: ["limit", "u32"] },
  Ping: {},
  Pong: {},
  ServerFrame: {
    1: ["request_id", "u64"], 10: ["welcome", "Welcome"], 11: ["send_ack", "SendAck"],
    12: ["event", "Event"], 13: ["sync_result", "SyncResult"], 14: ["events", "Events"],
    15: ["read_cursor", "ReadCursor"], 16: ["typing", "TypingNotice"],
    17: ["committed", "Committed"], 18: ["conversation_list", "ConversationList"],
    19: ["member_list", "MemberList"], 20: ["error", "Error"], 21: ["pong", "Pong"],
    22: ["goodbye", "Goodbye"],
  },
  Welcome: {
    1: ["session_id", "str"], 2: ["tenant", "str"], 3: ["user", "str"],
    4: ["expires_at", "u64"], 5: ["max_frame_bytes", "u32"],
  },
  SendAck: {
    1: ["client_msg_id", "str"], 2: ["conversation", "str"], 3: ["seq", "u64"],
    4: ["event_id", "str"], 5: ["server_time_ms", "i64"], 6: ["duplicate", "bool"],
  },
  ConversationState: {
    1: ["conversation", "str"], 2: ["head_seq", "u64"], 3: ["read_seq", "u64"],
    4: ["unread", "u64"], 5: ["events", "*Event"], 6: ["truncated", "bool"], 7: ["error", "Error"],
  },
  SyncResult: { 1: ["conversations", "*ConversationState"], 2: ["next_cursor", "str"] },
  Events: {
    1: ["conversation", "str"], 2: ["events", "*Event"], 3: ["head_seq", "u64"], 4: ["more", "bool"],
  },
  ReadCursor: { 1: ["conversation", "str"], 2: ["read_seq", "u64"] },
  TypingNotice: { 1: ["conversation", "str"], 2: ["user", "str"] },
  Committed: { 1: ["conversation", "str"], 2: ["seq", "u64"], 3: ["event_id", "str"] },
  ConversationSummary: {
    1: ["conversation", "str"], 2: ["head_seq", "u64"], 3: ["read_seq", "u64"], 4: ["unread", "u64"],
  },
  ConversationList: { 1: ["conversations", "*ConversationSummary"], 2: ["more", "bool"] },
  Member: { 1: ["user", "str"], 2: ["role", "enum"], 3: ["joined_seq", "u64"] },
  MemberList: { 1: ["members", "*Member"], 2: ["more", "bool"] },
  Error: {
    1: ["code", "enum"], 2: ["message", "str"], 3: ["retry_after_ms", "u64"],
    4: ["retryable", "bool"], 5: ["trace_id", "str"], 6: ["redirect_url", "str"],
  },
  Goodbye: { 1: ["reason", "enum"], 2: ["message", "str"] },
  Event: {
    1: ["tenant", "str"], 2: ["conversation", "str"], 3: ["seq", "u64"], 4: ["event_id", "str"],
    5: ["sender", "str"], 6: ["server_time_ms", "i64"], 7: ["client_msg_id", "str"],
    10: ["message_posted", "MessagePosted"], 11: ["message_edited", "MessageEdited"],
    12: ["message_recalled", "MessageRecalled"], 13: ["reaction_added", "ReactionAdded"],
    14: ["reaction_removed", "ReactionRemoved"], 15: ["member_joined", "MemberJoined"],
    16: ["member_left", "MemberLeft"], 17: ["conversation_created", "ConversationCreated"],
    18: ["conversation_renamed", "ConversationRenamed"],
  },
  MessagePosted: { 1: ["text", "str"], 2: ["mentions", "*str"], 3: ["reply_to_seq", "u64"] },
  MessageEdited: { 1: ["target_seq", "u64"], 2: ["new_text", "str"] },
  MessageRecalled: { 1: ["target_seq", "u64"] },
  ReactionAdded: { 1: ["target_seq", "u64"], 2: ["reaction", "str"] },
  ReactionRemoved: { 1: ["target_seq", "u64"], 2: ["reaction", "str"] },
  MemberJoined: { 1: ["user", "str"], 2: ["role", "enum"] },
  MemberLeft: { 1: ["user", "str"] },
  ConversationCreated: {
    1: ["kind", "enum"], 2: ["title", "str"], 3: ["creator", "str"], 4: ["members", "*str"],
  },
  ConversationRenamed: { 1: ["title", "str"] },
};

const ERROR_CODES = [
  "UNSPECIFIED", "BAD_FRAME", "UNKNOWN_OP", "NOT_AUTHENTICATED", "AUTH_FAILED",
  "TOKEN_EXPIRED", "INVALID_ID", "TOO_LARGE", "INVALID_REQUEST", "NOT_MEMBER", "NOT_ALLOWED",
  "NOT_FOUND", "ALREADY_EXISTS", "RATE_LIMITED", "UNAVAILABLE", "INTERNAL", "REJECTED",
  "WRONG_CELL",
];

const SCALAR = new Set(["str", "u64", "u32", "i64", "bool", "enum"]);
const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder("utf-8", { fatal: false });

class Writer {
  constructor() { this.bytes = []; }
  varint(n) {
    if (n < 0 || !Number.isSafeInteger(n)) throw new RangeError("varint out of range: " + n);
    while (n >= 0x80) {
      this.bytes.push((n % 0x80) | 0x80);
      n = Math.floor(n / 0x80);
    }
    this.bytes.push(n);
  }
  tag(field, wire) { this.varint(field * 8 + wire); }
  lengthDelimited(field, data) {
    this.tag(field, 2);
    this.varint(data.length);
    for (const b of data) this.bytes.push(b);
  }
}

function writeValue(w, field, type, value) {
  switch (type) {
    case "str":
      if (value !== "") w.lengthDelimited(field, utf8.encode(value));
      return;
    case "u64": case "u32": case "i64": case "enum":
      if (value !== 0) { w.tag(field, 0); w.varint(value); }
      return;
    case "bool":
      if (value) { w.tag(field, 0); w.varint(1); }
      return;
    default:
      w.lengthDelimited(field, encode(type, value));
  }
}

// Encodes `obj` as message `type`; returns a Uint8Array.
function encode(type, obj) {
  const schema = SCHEMA[type];
  if (!schema) throw new TypeError("unknown message " + type);
  const w = new Writer();
  for (const [num, [name, t]] of Object.entries(schema)) {
    const value = obj[name];
    if (value === undefined || value === null) continue;
    const field = Number(num);
    if (t.startsWith("*")) {
      for (const v of value) {
        // Repeated scalars are written one by one (strings cannot be packed; numbers
        // would be, but no repeated number is sent).
        if (t.slice(1) === "str") w.lengthDelimited(field, utf8.encode(v));
        else writeValue(w, field, t.slice(1), v);
      }
    } else {
      writeValue(w, field, t, value);
    }
  }
  return new Uint8Array(w.bytes);
}

class Reader {
  constructor(bytes, start, end) { this.b = bytes; this.pos = start; this.end = end; }
  varint() {
    let result = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.end) throw new RangeError("truncated varint");
      const byte = this.b[this.pos++];
      result += (byte & 0x7f) * scale;
      if (byte < 0x80) return result;
      scale *= 0x80;
    }
    throw new RangeError("varint too long");
  }
  skip(n) {
    if (this.pos + n > this.end) throw new RangeError("truncated field");
    this.pos += n;
  }
}

function defaults(schema) {
  const obj = {};
  for (const [name, t] of Object.values(schema)) {
    if (t.startsWith("*")) obj[name] = [];
    else if (t === "str") obj[name] = "";
    else if (t === "bool") obj[name] = false;
    else if (SCALAR.has(t)) obj[name] = 0;
    // messages stay undefined: absent
  }
  return obj;
}

function decodeAt(type, bytes, start, end) {
  const schema = SCHEMA[type];
  const obj = defaults(schema);
  const r = new Reader(bytes, start, end);
  while (r.pos < end) {
    const key = r.varint();
    const field = Math.floor(key / 8);
    const wire = key % 8;
    const spec = schema[field];
    if (wire === 0) {
      const v = r.varint();
      if (spec) {
        const t = spec[1].replace("*", "");
        const value = t === "bool" ? v !== 0 : v;
        if (spec[1].startsWith("*")) obj[spec[0]].push(value); else obj[spec[0]] = value;
      }
    } else if (wire === 2) {
      const len = r.varint();
      const from = r.pos;
      r.skip(len);
      if (!spec) continue;
      const t = spec[1].replace("*", "");
      let value;
      if (t === "str") value = fromUtf8.decode(bytes.subarray(from, from + len));
      else if (SCHEMA[t]) value = decodeAt(t, bytes, from, from + len);
      else {
        // A packed repeated number.
        const inner = new Reader(bytes, from, from + len);
        while (inner.pos < from + len) obj[spec[0]].push(inner.varint());
        continue;
      }
      if (spec[1].startsWith("*")) obj[spec[0]].push(value); else obj[spec[0]] = value;
    } else if (wire === 1) {
      r.skip(8);
    } else if (wire === 5) {
      r.skip(4);
    } else {
      throw new RangeError("unsupported wire type " + wire);
    }
  }
  return obj;
}

// Decodes message `type` from a Uint8Array.
function decode(type, bytes) {
  if (!SCHEMA[type]) throw new TypeError("unknown message " + type);
  return decodeAt(type, bytes, 0, bytes.length);
}

// The name of the oneof member set in `obj` among `names`, or undefined.
function which(obj, names) {
  return names.find((n) => obj[n] !== undefined);
}

window.TidingsProto = { encode, decode, which, SCHEMA, ERROR_CODES };
