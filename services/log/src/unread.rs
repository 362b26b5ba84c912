//! Unread counts that count only other people's messages.
//!
//! A user's unread count in a conversation is the number of messages (`message_posted`
//! events) after their read cursor that someone else sent. Joins, leaves, renames, edits,
//! recalls and reactions move the head but are not unread messages; one's own messages are
//! never unread.
//!
//! Without opening events: the head counts the conversation's messages
//! (`Head.messages`), every sealed event row carries the count as of its seq
//! (`SealedEvent.messages`), and a member's list entry keeps the count as of their read
//! cursor (`read_messages`) and the seqs of their own messages after it
//! (`own_after_read`, at most [`OWN_AFTER_READ_MAX`]). Then
//! `unread = head.messages − read_messages − |own_after_read|`.
//!
//! Conversations created before the count existed (`counts_messages` unset) keep the old
//! count, head minus read cursor.

use tidings_schemas::storage::{Head, UserConversation};
use tidings_schemas::v1::event::Body;

/// Own messages remembered after the read cursor. A user who sends more without reading has
/// read the conversation as far as their message: the cursor moves there.
pub const OWN_AFTER_READ_MAX: usize = 64;

/// Whether an event body counts as a message for unread counts.
pub fn is_message(body: &Body) -> bool {
    matches!(body, Body::MessagePosted(_))
}

/// The user's unread count: others' messages after the read cursor.
pub fn unread(head: &Head, entry: &UserConversation) -> u64 {
    if !(head.counts_messages && entry.counts_messages) {
        return head.last_seq.saturating_sub(entry.read_seq);
    }
    head.messages
        .saturating_sub(entry.read_messages)
        .saturating_sub(entry.own_after_read.len() as u64)
}

/// The list entry of a user who joins at `seq` (the join counts as read).
pub fn joined(seq: u64, head: &Head) -> UserConversation {
    UserConversation {
        joined_seq: seq,
        read_seq: seq,
        read_messages: head.messages,
        own_after_read: Vec::new(),
        counts_messages: head.counts_messages,
    }
}

/// The user posted a message at `seq`, the head counting `messages` with it. Returns the new
/// read cursor if it moved (past [`OWN_AFTER_READ_MAX`] own messages after it).
pub fn own_posted(entry: &mut UserConversation, seq: u64, messages: u64) -> Option<u64> {
    if !entry.counts_messages {
        return None;
    }
    if entry.own_after_read.len() < OWN_AFTER_READ_MAX {
        entry.own_after_read.push(seq);
        return None;
    }
    entry.read_seq = seq;
    entry.read_messages = messages;
    entry.own_after_read.clear();
    Some(seq)
}

/// Moves the read cursor forward to `target`; `messages_at`: the message count as of
/// `target`, when known (not when that event was archived: the count then stays as it was,
/// so the unread count errs high until the cursor moves again).
pub fn read_to(entry: &mut UserConversation, target: u64, messages_at: Option<u64>) {
    debug_assert!(target > entry.read_seq);
    entry.read_seq = target;
    if let Some(m) = messages_at {
        entry.read_messages = entry.read_messages.max(m);
    }
    entry.own_after_read.retain(|s| *s > target);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(last_seq: u64, messages: u64) -> Head {
        Head {
            last_seq,
            messages,
            counts_messages: true,
            ..Head::default()
        }
    }

    #[test]
    fn own_messages_and_other_events_are_not_unread() {
        // seq 1 created (joined), 2-4 others' messages, 5 a reaction, 6 own message.
        let mut me = joined(1, &head(1, 0));
        assert_eq!(own_posted(&mut me, 6, 4), None);
        assert_eq!(unread(&head(6, 4), &me), 3);
        // Read up to seq 3 (two messages then): one other message left, and the own one
        // after the cursor still not counted.
        read_to(&mut me, 3, Some(2));
        assert_eq!(unread(&head(6, 4), &me), 1);
        read_to(&mut me, 6, Some(4));
        assert_eq!(unread(&head(6, 4), &me), 0);
        assert!(me.own_after_read.is_empty());
    }

    #[test]
    fn past_the_bound_sending_moves_the_cursor() {
        let mut me = joined(1, &head(1, 0));
        for i in 0..OWN_AFTER_READ_MAX as u64 {
            assert_eq!(own_posted(&mut me, 2 + i, 1 + i), None);
        }
        let seq = 2 + OWN_AFTER_READ_MAX as u64;
        assert_eq!(own_posted(&mut me, seq, seq - 1), Some(seq));
        assert_eq!(unread(&head(seq, seq - 1), &me), 0);
        assert!(me.own_after_read.is_empty());
    }

    #[test]
    fn conversations_from_before_the_count_keep_the_old_count() {
        let old = Head {
            last_seq: 9,
            ..Head::default()
        };
        let entry = UserConversation {
            read_seq: 4,
            ..UserConversation::default()
        };
        assert_eq!(unread(&old, &entry), 5);
    }
}
