//! The keyspace: one ordered KV, order-preserving keys.
//!
//! ```text
//! ev/tenant/conv/seq                    sealed Event
//! hd/tenant/conv                        Head
//! dd/tenant/conv/sender/client_msg_id   Dedupe (seq, event id, time of the original)
//! mb/tenant/conv/user                   Membership
//! mc/tenant/conv/seq/user               MembershipChange (the member list's change feed)
//! uc/tenant/user/conv                   UserConversation (the user's list, read cursor)
//! uw/tenant/user/conv/joined_seq        a membership window that ended: the seq it ended at (8-byte BE)
//! kr/tenant/key_id                      WrappedKey
//! ks/tenant                             Shredded (the tenant's data keys were destroyed)
//! ax/tenant/conv/first_seq              ArchiveRun (archive index: seq range -> segment, row group)
//! ax/tenant/conv/0                      ArchiveRun with no segment: retention deleted 1..=last_seq
//! sg/tenant/segment_id                  ArchiveSegment (one verified Parquet object)
//! au/tenant/seq                         AuditRecord, sealed under the audit key (hash-chained)
//! ah/tenant                             AuditHead
//! lh/tenant/hold_id                     Hold (legal hold), sealed under the audit key
//! rv/tenant/j/jti                       revoked token id: when it was revoked (8-byte BE secs)
//! rv/tenant/u/user                      user cutoff: tokens issued at or before it are revoked
//! bt/tenant/bot                         bot account (bots.rs): created, revoked, by whom
//! wh/tenant/id                          WebhookSubscription (secret sealed under the tenant's key)
//! wc/tenant/id/conv                     webhook cursor: last seq delivered or dead-lettered (8-byte BE)
//! wr/tenant/id/conv                     webhook replay asked for: deliver again from this seq (8-byte BE)
//! wd/tenant/id/conv/seq                 WebhookDeadLetter (an event given up on)
//! sx/tenant/conv/key_id/tag/seq          hot search posting: 8-byte BE server time (hot_index)
//! si/tenant/conv                        hot search index: indexed through seq (8-byte BE)
//! sf/tenant/conv/seq                    a message's fate: latest text seq (8) + recalled (1)
//! cd/tenant                             CellPlacement (cells.rs: home cell, DR cell, tier)
//! ro/partition/epoch/n                  ReplicaBatch waiting for the relay (replicated tenants)
//! ri/source_cell/partition              replica applied through (epoch 8, n 8) from a home cell
//! rl/tenant/conv/seq                    an event this cell acknowledged that its DR cell never
//!                                       got, kept when the DR cell's history replaced it
//! ls/partition                          Lease (who owns a partition of conversations)
//! sy/partitions                         Partitions (the count, fixed at the first open)
//! sy/key_check                          proof that the master key opens this store
//! sy/audit_key                          the audit key, wrapped by the master key
//! ```
//! Parts are joined by 0x00, which no id can contain, so a prefix of one tenant is never a
//! prefix of another (`ev\0a\0` vs `ev\0ab\0`). Numbers are 8- or 4-byte big-endian so byte
//! order is numeric order.

use crate::ids::{ClientMsgId, ConvId, TenantId, UserId};
use crate::store::KeyRange;

const SEP: u8 = 0;

fn key(prefix: &[u8], parts: &[&str]) -> Vec<u8> {
    let len = prefix.len() + parts.iter().map(|p| p.len() + 1).sum::<usize>() + 8;
    let mut k = Vec::with_capacity(len);
    k.extend_from_slice(prefix);
    for part in parts {
        k.push(SEP);
        k.extend_from_slice(part.as_bytes());
    }
    k
}

/// `key(prefix, parts)` followed by a separator: the prefix of every key below it.
fn dir(prefix: &[u8], parts: &[&str]) -> Vec<u8> {
    let mut k = key(prefix, parts);
    k.push(SEP);
    k
}

pub fn event(t: &TenantId, c: &ConvId, seq: u64) -> Vec<u8> {
    let mut k = event_dir(t, c);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn event_dir(t: &TenantId, c: &ConvId) -> Vec<u8> {
    dir(b"ev", &[t.as_str(), c.as_str()])
}

/// Events `from..=to` of one conversation.
pub fn event_range(t: &TenantId, c: &ConvId, from: u64, to: u64) -> KeyRange {
    event_range_with(event_dir(t, c), from, to)
}

/// Keys `dir ++ seq` for seq in `from..=to`.
fn event_range_with(dir: Vec<u8>, from: u64, to: u64) -> KeyRange {
    let at = |seq: u64| {
        let mut k = dir.clone();
        k.extend_from_slice(&seq.to_be_bytes());
        k
    };
    let end = match to.checked_add(1) {
        Some(next) => at(next),
        None => KeyRange::prefix(dir.clone()).end,
    };
    KeyRange {
        start: at(from),
        end,
    }
}

/// The seq at the end of an event key.
pub fn event_seq(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// (conversation, seq) of an `ev/` key.
pub fn event_ids(key: &[u8]) -> Option<(ConvId, u64)> {
    let rest = key.strip_prefix(b"ev\0".as_slice())?;
    let seq = event_seq(rest)?;
    let ids = &rest[..rest.len() - 8];
    let mut parts = ids.split(|&b| b == SEP);
    let (_tenant, conv) = (parts.next()?, parts.next()?);
    ConvId::new(std::str::from_utf8(conv).ok()?)
        .ok()
        .map(|c| (c, seq))
}

pub fn head(t: &TenantId, c: &ConvId) -> Vec<u8> {
    key(b"hd", &[t.as_str(), c.as_str()])
}

pub fn dedupe(t: &TenantId, c: &ConvId, sender: &UserId, id: &ClientMsgId) -> Vec<u8> {
    key(
        b"dd",
        &[t.as_str(), c.as_str(), sender.as_str(), id.as_str()],
    )
}

pub fn member(t: &TenantId, c: &ConvId, u: &UserId) -> Vec<u8> {
    key(b"mb", &[t.as_str(), c.as_str(), u.as_str()])
}

pub fn member_dir(t: &TenantId, c: &ConvId) -> Vec<u8> {
    dir(b"mb", &[t.as_str(), c.as_str()])
}

/// A membership change made by event `seq`.
pub fn member_change(t: &TenantId, c: &ConvId, seq: u64, u: &UserId) -> Vec<u8> {
    let mut k = member_change_dir(t, c);
    k.extend_from_slice(&seq.to_be_bytes());
    k.push(SEP);
    k.extend_from_slice(u.as_str().as_bytes());
    k
}

pub fn member_change_dir(t: &TenantId, c: &ConvId) -> Vec<u8> {
    dir(b"mc", &[t.as_str(), c.as_str()])
}

/// The membership changes made after event `seq`.
pub fn member_changes_after(t: &TenantId, c: &ConvId, seq: u64) -> KeyRange {
    let dir = member_change_dir(t, c);
    let mut range = KeyRange::prefix(dir.clone());
    range.start = [dir.as_slice(), &seq.saturating_add(1).to_be_bytes()].concat();
    range
}

/// The seq and user of a membership change's key.
pub fn member_change_parts(dir: &[u8], key: &[u8]) -> Option<(u64, String)> {
    let rest = key.strip_prefix(dir)?;
    let seq = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let user = rest.get(9..)?;
    Some((seq, String::from_utf8(user.to_vec()).ok()?))
}

pub fn user_conv(t: &TenantId, u: &UserId, c: &ConvId) -> Vec<u8> {
    key(b"uc", &[t.as_str(), u.as_str(), c.as_str()])
}

pub fn user_conv_dir(t: &TenantId, u: &UserId) -> Vec<u8> {
    dir(b"uc", &[t.as_str(), u.as_str()])
}

/// A membership window of `u` in `c` that ended: `u` joined at event `joined`; the value is
/// the seq of the event that ended it (their leave or removal).
pub fn user_window(t: &TenantId, u: &UserId, c: &ConvId, joined: u64) -> Vec<u8> {
    let mut k = dir(b"uw", &[t.as_str(), u.as_str(), c.as_str()]);
    k.extend_from_slice(&joined.to_be_bytes());
    k
}

/// Every ended membership window of `u`, by conversation and then join seq.
pub fn user_window_dir(t: &TenantId, u: &UserId) -> Vec<u8> {
    dir(b"uw", &[t.as_str(), u.as_str()])
}

/// The conversation and join seq of a [`user_window`] key under `dir`.
pub fn user_window_parts(dir: &[u8], key: &[u8]) -> Option<(String, u64)> {
    let rest = key.strip_prefix(dir)?;
    let split = rest.len().checked_sub(9)?;
    if rest[split] != SEP {
        return None;
    }
    let joined = u64::from_be_bytes(rest[split + 1..].try_into().ok()?);
    Some((String::from_utf8(rest[..split].to_vec()).ok()?, joined))
}

pub fn data_key(t: &TenantId, key_id: u32) -> Vec<u8> {
    let mut k = data_key_dir(t);
    k.extend_from_slice(&key_id.to_be_bytes());
    k
}

pub fn data_key_dir(t: &TenantId) -> Vec<u8> {
    dir(b"kr", &[t.as_str()])
}

/// The shred marker of a tenant: present once its data keys were destroyed.
pub fn shredded(t: &TenantId) -> Vec<u8> {
    key(b"ks", &[t.as_str()])
}

/// The key id at the end of a `kr/` key.
pub fn data_key_id(key: &[u8]) -> Option<u32> {
    let tail: [u8; 4] = key.get(key.len().checked_sub(4)?..)?.try_into().ok()?;
    Some(u32::from_be_bytes(tail))
}

pub fn archive_run(t: &TenantId, c: &ConvId, first_seq: u64) -> Vec<u8> {
    let mut k = archive_run_dir(t, c);
    k.extend_from_slice(&first_seq.to_be_bytes());
    k
}

pub fn archive_run_dir(t: &TenantId, c: &ConvId) -> Vec<u8> {
    dir(b"ax", &[t.as_str(), c.as_str()])
}

/// Every archive run of a tenant.
pub fn archive_tenant_dir(t: &TenantId) -> Vec<u8> {
    dir(b"ax", &[t.as_str()])
}

/// (conversation, first seq) of an archive run key under [`archive_tenant_dir`].
pub fn archive_run_parts(tenant_dir: &[u8], key: &[u8]) -> Option<(String, u64)> {
    let rest = key.strip_prefix(tenant_dir)?;
    let sep = rest.iter().position(|&b| b == SEP)?;
    let conv = String::from_utf8(rest[..sep].to_vec()).ok()?;
    Some((conv, event_seq(key)?))
}

/// Archive runs of one conversation whose first seq is at most `seq`: scanned descending, the
/// first hit is the run that holds `seq` (if any run does).
pub fn archive_runs_through(t: &TenantId, c: &ConvId, seq: u64) -> KeyRange {
    event_range_with(archive_run_dir(t, c), 0, seq)
}

pub fn segment(t: &TenantId, segment_id: &str) -> Vec<u8> {
    key(b"sg", &[t.as_str(), segment_id])
}

pub fn segment_dir(t: &TenantId) -> Vec<u8> {
    dir(b"sg", &[t.as_str()])
}

/// Every conversation head of every tenant (`hd/`), or of one tenant.
pub fn head_dir(t: Option<&TenantId>) -> Vec<u8> {
    match t {
        Some(t) => dir(b"hd", &[t.as_str()]),
        None => dir(b"hd", &[]),
    }
}

/// (tenant, conversation) of a `hd/` key.
pub fn head_ids(key: &[u8]) -> Option<(String, String)> {
    let rest = key.strip_prefix(b"hd\0".as_slice())?;
    let sep = rest.iter().position(|&b| b == SEP)?;
    let tenant = String::from_utf8(rest[..sep].to_vec()).ok()?;
    let conv = String::from_utf8(rest[sep + 1..].to_vec()).ok()?;
    Some((tenant, conv))
}

/// The first key after every `hd/` key of `tenant`: where a scan skips to the next tenant.
pub fn after_tenant_heads(t: &str) -> Vec<u8> {
    let mut k = key(b"hd", &[t]);
    k.push(SEP + 1);
    k
}

/// A bot account of a tenant.
pub fn bot(t: &TenantId, bot: &UserId) -> Vec<u8> {
    key(b"bt", &[t.as_str(), bot.as_str()])
}

/// Every bot account of a tenant.
pub fn bots(t: &TenantId) -> KeyRange {
    KeyRange::prefix(dir(b"bt", &[t.as_str()]))
}

/// The revocation record of one token id (`jti`) of a tenant.
pub fn revoked_jti(t: &TenantId, jti: &str) -> Vec<u8> {
    key(b"rv", &[t.as_str(), "j", jti])
}

/// The revocation cutoff of one user of a tenant.
pub fn revoked_user(t: &TenantId, u: &UserId) -> Vec<u8> {
    key(b"rv", &[t.as_str(), "u", u.as_str()])
}

/// The tenant-scoped prefixes the sequencer writes (what a replica batch may carry, cells.rs):
/// a new one the sequencer writes must be added here, or DR cells refuse its batches.
pub const SEQUENCED_PREFIXES: [&[u8]; 7] = [
    b"ev\0", b"hd\0", b"dd\0", b"mb\0", b"mc\0", b"uc\0", b"uw\0",
];

/// Where a tenant lives (cells.rs).
pub fn cell_placement(t: &TenantId) -> Vec<u8> {
    key(b"cd", &[t.as_str()])
}

/// Every placement of the directory.
pub fn cell_directory() -> KeyRange {
    KeyRange::prefix(b"cd\0".to_vec())
}

/// The outbox of a partition (`ro/partition`); rows below it are ordered by (epoch, n).
pub fn outbox_dir(partition: u32) -> Vec<u8> {
    let mut k = b"ro\0".to_vec();
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// Every outbox row, of every partition.
pub fn outbox_all() -> Vec<u8> {
    b"ro\0".to_vec()
}

/// One outbox row: a commit's writes of one replicated tenant.
pub fn outbox(partition: u32, epoch: u64, n: u64) -> Vec<u8> {
    let mut k = outbox_dir(partition);
    k.extend_from_slice(&epoch.to_be_bytes());
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// How far the replicas of one home cell's partition have been applied here.
pub fn replica_mark(source: &str, partition: u32) -> Vec<u8> {
    let mut k = key(b"ri", &[source]);
    k.push(SEP);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// An acknowledged event of this cell that the DR cell's history replaced (failback after an
/// unplanned failover): kept for the report, never served.
pub fn replica_lost(t: &TenantId, c: &ConvId, seq: u64) -> Vec<u8> {
    let mut k = dir(b"rl", &[t.as_str(), c.as_str()]);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Every kept lost event of a tenant.
pub fn replica_lost_dir(t: &TenantId) -> KeyRange {
    KeyRange::prefix(dir(b"rl", &[t.as_str()]))
}

/// The tenant a key of the tenant-scoped prefixes belongs to (`ev`, `hd`, `dd`, `mb`, `mc`,
/// `uc`, ...: `xx\0tenant\0...`).
pub fn tenant_of(key: &[u8]) -> Option<&str> {
    let rest = key.get(3..)?;
    if key.get(2) != Some(&SEP) {
        return None;
    }
    let end = rest.iter().position(|&b| b == SEP).unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).ok()
}

pub const KEY_CHECK: &[u8] = b"sy\0key_check";

/// How many partitions conversations hash into; fixed at the first open of a store.
pub const PARTITIONS: &[u8] = b"sy\0partitions";

/// The lease of a partition: `ls/` and the partition as 4-byte big-endian.
pub fn lease(partition: u32) -> Vec<u8> {
    let mut k = b"ls\0".to_vec();
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// The `tenant\0conv` part of a `hd/` or `mb/` key: what a conversation's partition is
/// hashed from, so a cached key can be told apart by partition without parsing ids.
pub fn conversation_part(key: &[u8]) -> Option<&[u8]> {
    let rest = key.get(3..)?;
    let tenant_end = rest.iter().position(|&b| b == SEP)?;
    let conv_end = rest[tenant_end + 1..]
        .iter()
        .position(|&b| b == SEP)
        .map_or(rest.len(), |i| tenant_end + 1 + i);
    Some(&rest[..conv_end])
}

/// Every hot search posting of a conversation (`hot_index`).
pub fn search_posting_dir(t: &TenantId, c: &ConvId) -> Vec<u8> {
    dir(b"sx", &[t.as_str(), c.as_str()])
}

/// Postings of term `tag` under search key `key_id`, for seqs `from..=to`.
pub fn search_postings(
    t: &TenantId,
    c: &ConvId,
    key_id: u32,
    tag: &[u8],
    from: u64,
    to: u64,
) -> KeyRange {
    let mut d = search_posting_dir(t, c);
    d.extend_from_slice(&key_id.to_be_bytes());
    d.extend_from_slice(tag);
    event_range_with(d, from, to)
}

/// One posting: term `tag` (under search key `key_id`) occurs in the text of event `seq`.
pub fn search_posting(t: &TenantId, c: &ConvId, key_id: u32, tag: &[u8], seq: u64) -> Vec<u8> {
    search_postings(t, c, key_id, tag, seq, seq).start
}

/// How far the hot search index of a conversation is built.
pub fn search_watermark(t: &TenantId, c: &ConvId) -> Vec<u8> {
    key(b"si", &[t.as_str(), c.as_str()])
}

/// The fate (latest edit, recall) of message `seq`.
pub fn search_fate(t: &TenantId, c: &ConvId, seq: u64) -> Vec<u8> {
    let mut k = search_fate_dir(t, c);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn search_fate_dir(t: &TenantId, c: &ConvId) -> Vec<u8> {
    dir(b"sf", &[t.as_str(), c.as_str()])
}

/// Fates of messages `from..=to`.
pub fn search_fates(t: &TenantId, c: &ConvId, from: u64, to: u64) -> KeyRange {
    event_range_with(search_fate_dir(t, c), from, to)
}

/// The store-wide key that seals audit records and holds, wrapped by the master key.
pub const AUDIT_KEY: &[u8] = b"sy\0audit_key";

/// The retention marker of a conversation: an `ax/` key with first seq 0, which no real run
/// has (seqs start at 1), so it sorts before every run.
pub fn purge_marker(t: &TenantId, c: &ConvId) -> Vec<u8> {
    archive_run(t, c, 0)
}

pub fn audit(t: &TenantId, seq: u64) -> Vec<u8> {
    let mut k = audit_dir(t);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn audit_dir(t: &TenantId) -> Vec<u8> {
    dir(b"au", &[t.as_str()])
}

/// Audit records `from..=to` of a tenant.
pub fn audit_range(t: &TenantId, from: u64, to: u64) -> KeyRange {
    event_range_with(audit_dir(t), from, to)
}

pub fn audit_head(t: &TenantId) -> Vec<u8> {
    key(b"ah", &[t.as_str()])
}

pub fn hold(t: &TenantId, id: &str) -> Vec<u8> {
    key(b"lh", &[t.as_str(), id])
}

pub fn hold_dir(t: &TenantId) -> Vec<u8> {
    dir(b"lh", &[t.as_str()])
}

/// A webhook subscription of a tenant.
pub fn webhook(t: &TenantId, id: &str) -> Vec<u8> {
    key(b"wh", &[t.as_str(), id])
}

/// The subscriptions of one tenant, or of every tenant (the dispatcher's list).
pub fn webhook_dir(t: Option<&TenantId>) -> Vec<u8> {
    match t {
        Some(t) => dir(b"wh", &[t.as_str()]),
        None => b"wh\0".to_vec(),
    }
}

/// The `(tenant, id)` of a `wh/` key.
pub fn webhook_ids(key: &[u8]) -> Option<(String, String)> {
    let rest = key.strip_prefix(b"wh\0")?;
    let sep = rest.iter().position(|&b| b == SEP)?;
    let tenant = std::str::from_utf8(&rest[..sep]).ok()?;
    let id = std::str::from_utf8(&rest[sep + 1..]).ok()?;
    Some((tenant.to_string(), id.to_string()))
}

/// The delivery cursor of a subscription in one conversation.
pub fn webhook_cursor(t: &TenantId, id: &str, c: &ConvId) -> Vec<u8> {
    key(b"wc", &[t.as_str(), id, c.as_str()])
}

/// A replay asked for in one conversation of a subscription.
pub fn webhook_replay(t: &TenantId, id: &str, c: &ConvId) -> Vec<u8> {
    key(b"wr", &[t.as_str(), id, c.as_str()])
}

/// A dead-lettered event of a subscription.
pub fn webhook_dead(t: &TenantId, id: &str, c: &ConvId, seq: u64) -> Vec<u8> {
    let mut k = dir(b"wd", &[t.as_str(), id, c.as_str()]);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Every row of one kind (`wc`, `wr`, `wd`) that belongs to a subscription.
pub fn webhook_rows(kind: &[u8; 2], t: &TenantId, id: &str) -> Vec<u8> {
    dir(kind, &[t.as_str(), id])
}

/// The `(conversation, seq)` of a `wd/` key under [`webhook_rows`]`(b"wd", ..)`.
pub fn webhook_dead_parts(dir: &[u8], key: &[u8]) -> Option<(String, u64)> {
    let rest = key.strip_prefix(dir)?;
    let conv_end = rest.len().checked_sub(9)?;
    if rest.get(conv_end) != Some(&SEP) {
        return None;
    }
    let conv = std::str::from_utf8(&rest[..conv_end]).ok()?;
    Some((conv.to_string(), event_seq(key)?))
}

/// The last part of a key under `dir` (a member's user id, a user's conversation id).
pub fn last_part(dir: &[u8], key: &[u8]) -> Option<String> {
    let rest = key.strip_prefix(dir)?;
    String::from_utf8(rest.to_vec()).ok()
}

pub use tidings_log_api::error::display_key;

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (TenantId, ConvId) {
        (
            TenantId::new("t").expect("id"),
            ConvId::new("c").expect("id"),
        )
    }

    #[test]
    fn event_keys_sort_by_seq() {
        let (t, c) = ids();
        let mut keys: Vec<_> = [300u64, 2, 1, 256, 70_000].map(|s| event(&t, &c, s)).into();
        keys.sort();
        let seqs: Vec<_> = keys.iter().map(|k| event_seq(k).expect("seq")).collect();
        assert_eq!(seqs, vec![1, 2, 256, 300, 70_000]);
    }

    #[test]
    fn one_tenant_prefix_never_covers_another() {
        let a = TenantId::new("a").expect("id");
        let ab = TenantId::new("ab").expect("id");
        let c = ConvId::new("c").expect("id");
        let range = KeyRange::prefix(event_dir(&a, &c));
        assert!(range.contains(&event(&a, &c, 1)));
        assert!(!range.contains(&event(&ab, &c, 1)));
    }

    #[test]
    fn member_changes_sort_by_seq_stay_in_their_conversation_and_parse_back() {
        let (t, c) = ids();
        let cx = ConvId::new("cx").expect("id");
        let (bob, al) = (
            UserId::new("bob").expect("id"),
            UserId::new("al").expect("id"),
        );
        let mut keys = [
            member_change(&t, &c, 300, &al),
            member_change(&t, &c, 2, &bob),
            member_change(&t, &c, 2, &al),
        ];
        keys.sort();
        assert_eq!(keys[0], member_change(&t, &c, 2, &al));
        assert_eq!(keys[2], member_change(&t, &c, 300, &al));
        let after_2 = member_changes_after(&t, &c, 2);
        assert!(!after_2.contains(&keys[1]));
        assert!(after_2.contains(&keys[2]));
        assert!(!after_2.contains(&member_change(&t, &cx, 300, &al)));
        assert!(!after_2.contains(&member(&t, &c, &al)));
        let dir = member_change_dir(&t, &c);
        assert_eq!(
            member_change_parts(&dir, &keys[2]),
            Some((300, "al".to_string()))
        );
    }

    #[test]
    fn user_windows_stay_with_their_user_and_parse_back() {
        let (t, c) = ids();
        let al = UserId::new("al").expect("id");
        let alx = UserId::new("alx").expect("id");
        let dir = user_window_dir(&t, &al);
        let k = user_window(&t, &al, &c, u64::MAX);
        assert!(KeyRange::prefix(dir.clone()).contains(&k));
        assert!(!KeyRange::prefix(dir.clone()).contains(&user_window(&t, &alx, &c, 1)));
        assert_eq!(user_window_parts(&dir, &k), Some(("c".into(), u64::MAX)));
        assert!(user_window(&t, &al, &c, 2) < user_window(&t, &al, &c, 300));
        assert_eq!(user_window_parts(&dir, &dir), None);
    }

    #[test]
    fn conversation_part_of_heads_and_members() {
        let (t, c) = ids();
        let u = UserId::new("u").expect("id");
        assert_eq!(conversation_part(&head(&t, &c)), Some(b"t\0c".as_slice()));
        assert_eq!(
            conversation_part(&member(&t, &c, &u)),
            Some(b"t\0c".as_slice())
        );
    }

    #[test]
    fn revocation_keys_never_cross_tenants_or_kinds() {
        let a = TenantId::new("a").expect("id");
        let ab = TenantId::new("ab").expect("id");
        let u = UserId::new("u").expect("id");
        let a_dir = KeyRange::prefix(dir(b"rv", &[a.as_str()]));
        assert!(a_dir.contains(&revoked_jti(&a, "x")));
        assert!(a_dir.contains(&revoked_user(&a, &u)));
        assert!(!a_dir.contains(&revoked_jti(&ab, "x")));
        assert!(!a_dir.contains(&revoked_user(&ab, &u)));
        // A jti that looks like a user key stays a jti key.
        assert_ne!(revoked_jti(&a, "u"), revoked_user(&a, &u));
        assert_ne!(revoked_jti(&a, "u\0u"), revoked_user(&a, &u));
    }

    #[test]
    fn bot_accounts_stay_in_their_tenant() {
        let a = TenantId::new("a").expect("id");
        let ab = TenantId::new("ab").expect("id");
        let b = UserId::new("bot-x").expect("id");
        assert!(bots(&a).contains(&bot(&a, &b)));
        assert!(!bots(&a).contains(&bot(&ab, &b)));
        assert!(!bots(&ab).contains(&bot(&a, &b)));
    }

    #[test]
    fn webhook_rows_never_cross_tenants_or_subscriptions_and_parse_back() {
        let (a, c) = ids();
        let ab = TenantId::new("tb").expect("id");
        let all = KeyRange::prefix(webhook_dir(None));
        let of_a = KeyRange::prefix(webhook_dir(Some(&a)));
        assert!(all.contains(&webhook(&a, "s1")) && all.contains(&webhook(&ab, "s1")));
        assert!(of_a.contains(&webhook(&a, "s1")));
        assert!(!of_a.contains(&webhook(&ab, "s1")));
        assert_eq!(
            webhook_ids(&webhook(&a, "s1")),
            Some(("t".to_string(), "s1".to_string()))
        );
        let cursors = KeyRange::prefix(webhook_rows(b"wc", &a, "s"));
        assert!(cursors.contains(&webhook_cursor(&a, "s", &c)));
        assert!(!cursors.contains(&webhook_cursor(&a, "s1", &c)));
        let dead = webhook_rows(b"wd", &a, "s");
        let key = webhook_dead(&a, "s", &c, 300);
        assert!(KeyRange::prefix(dead.clone()).contains(&key));
        assert_eq!(
            webhook_dead_parts(&dead, &key),
            Some(("c".to_string(), 300))
        );
        assert!(!KeyRange::prefix(webhook_rows(b"wr", &a, "s")).contains(&key));
    }

    #[test]
    fn event_range_is_inclusive_and_handles_max_seq() {
        let (t, c) = ids();
        let r = event_range(&t, &c, 2, 3);
        assert!(!r.contains(&event(&t, &c, 1)));
        assert!(r.contains(&event(&t, &c, 2)));
        assert!(r.contains(&event(&t, &c, 3)));
        assert!(!r.contains(&event(&t, &c, 4)));
        let all = event_range(&t, &c, 1, u64::MAX);
        assert!(all.contains(&event(&t, &c, u64::MAX)));
    }
}
