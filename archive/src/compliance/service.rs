//! [`Compliance`]: the only way to read message content for compliance. Each request is
//! recorded in the tenant's audit log before anything is read and again when it ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tidings_log::crypto::Keyring;
use tidings_log::search::{Needle, kind_term};
use tidings_log::store::KvStore;
use tidings_log::{Body, Event, TenantId};
use tokio::sync::RwLock;

use super::audit::{self, Entry};
use super::hit::event_text;
use super::scan::{HotQuery, IndexedText, Scanner, Selection, Visitor};
use super::{Actor, ComplianceError, Edit, Fate, Hit, Query, Recall, Tier};
use crate::storage::Objects;

/// Counters a caller may watch while a request runs (the export progress bar).
#[derive(Debug, Default)]
pub struct Progress {
    /// Events looked at, pruned or not.
    pub scanned: AtomicU64,
    /// Events decrypted.
    pub opened: AtomicU64,
    pub hits: AtomicU64,
    pub segments_total: AtomicU64,
    pub segments_done: AtomicU64,
}

/// Where results go: stdout, an HTTP response, an export file.
#[async_trait::async_trait]
pub trait Sink: Send {
    async fn hit(&mut self, hit: Hit) -> Result<(), ComplianceError>;

    /// Called once after the last hit, before the request is recorded as completed: an export
    /// file is made durable and moved into place here.
    async fn finish(&mut self) -> Result<(), ComplianceError> {
        Ok(())
    }
}

/// What is being done with the results, as the audit log records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Search,
    /// An export to a destination (a path, or a description of one).
    Export {
        destination: String,
    },
}

pub struct Compliance {
    store: Arc<dyn KvStore>,
    keyring: Arc<Keyring>,
    objects: Option<Objects>,
    /// Held shared by compliance reads and exclusively by an archive pass in the same
    /// process, so a read never sees events halfway between the tiers.
    gate: Arc<RwLock<()>>,
    /// Whether text filters use the segments' search indexes (the default); without, every
    /// candidate row is opened. Both give the same results.
    use_index: bool,
}

const FATE_KINDS: &[&str] = &crate::search_index::INDEXED_KINDS;
const TEXT_KINDS: &[&str] = &[
    "message_posted",
    "conversation_created",
    "conversation_renamed",
];

impl Compliance {
    pub fn new(
        store: Arc<dyn KvStore>,
        keyring: Arc<Keyring>,
        objects: Option<Objects>,
        gate: Arc<RwLock<()>>,
    ) -> Self {
        Compliance {
            store,
            keyring,
            objects,
            gate,
            use_index: true,
        }
    }

    /// Text filters scan every candidate row instead of asking the search indexes (for
    /// comparing the two and measuring the difference).
    pub fn without_index(mut self) -> Self {
        self.use_index = false;
        self
    }

    pub fn store(&self) -> &Arc<dyn KvStore> {
        &self.store
    }

    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
    }

    /// Appends one record to a tenant's audit log.
    pub async fn record(&self, tenant: &TenantId, entry: &Entry) -> Result<u64, ComplianceError> {
        Ok(audit::append(&*self.store, &self.keyring, tenant, entry).await?)
    }

    /// Records a refused access attempt (wrong role, another tenant's token, a shredded
    /// tenant) in the target tenant's audit log.
    pub async fn deny(
        &self,
        tenant: &TenantId,
        actor: &Actor,
        action: &str,
        filters: String,
        reason: &str,
    ) -> Result<(), ComplianceError> {
        let mut entry = Entry::new(actor, action, "denied");
        entry.access_id = uuid::Uuid::now_v7().to_string();
        entry.filters = filters;
        entry.detail = reason.to_string();
        self.record(tenant, &entry).await.map(|_| ())
    }

    /// Runs a search or export: records it as started (nothing is read if that fails),
    /// streams the hits into `sink`, finishes the sink, and records the outcome with the
    /// row count. Returns the number of hits.
    pub async fn search(
        &self,
        query: &Query,
        actor: &Actor,
        action: &Action,
        progress: &Progress,
        sink: &mut dyn Sink,
    ) -> Result<u64, ComplianceError> {
        let tenant = query.validate()?;
        let (name, destination) = match action {
            Action::Search => ("search", String::new()),
            Action::Export { destination } => ("export", destination.clone()),
        };
        let mut entry = Entry::new(actor, name, "started");
        entry.access_id = uuid::Uuid::now_v7().to_string();
        entry.filters = query.to_json().to_string();
        entry.destination = destination;
        self.record(tenant, &entry).await?;

        let result = async {
            let _reading = self.gate.read().await;
            self.run(tenant, query, progress, sink).await?;
            sink.finish().await
        }
        .await;
        entry.rows = progress.hits.load(Ordering::Relaxed);
        match &result {
            Ok(()) => entry.outcome = "completed".into(),
            Err(e) => {
                entry.outcome = "failed".into();
                entry.detail = format!("{}: {e}", e.code());
            }
        }
        self.record(tenant, &entry).await?;
        result.map(|()| entry.rows)
    }

    async fn run(
        &self,
        tenant: &TenantId,
        query: &Query,
        progress: &Progress,
        sink: &mut dyn Sink,
    ) -> Result<(), ComplianceError> {
        let scanner = Scanner {
            store: &*self.store,
            keyring: &self.keyring,
            objects: self.objects.as_ref(),
            progress,
        };
        // What happened to messages later: every edit and recall from the start of the range
        // on (an edit is never older than its message).
        let mut fates = Fates::default();
        // In the hot log, the index lists edits and recalls under their kinds' terms.
        let fate_hot = HotQuery {
            any_of: FATE_KINDS.iter().map(|k| vec![kind_term(k)]).collect(),
            also: HashMap::new(),
        };
        // In the archive, version 2 segment indexes list them too.
        let fate_rows = IndexedText::of_kinds(FATE_KINDS);
        let fate_sel = Selection {
            conv: query.conv.as_ref(),
            from_ms: query.from_ms,
            kinds: Some(FATE_KINDS),
            text: self.use_index.then_some(&fate_rows),
            hot: self.use_index.then_some(&fate_hot),
            ..Selection::default()
        };
        scanner.scan(tenant, fate_sel, &mut fates).await?;
        let needle = match &query.text {
            None => None,
            Some(text) => {
                Some(Needle::new(text).map_err(|e| ComplianceError::invalid(e.to_string()))?)
            }
        };
        // With an index, the archive and the hot log open only events holding the query's
        // terms and the messages an edit of which matches.
        let (indexed, hot) = match &needle {
            Some(needle) if self.use_index && !needle.terms().is_empty() => {
                let edited: Vec<(String, u64)> = fates
                    .0
                    .iter()
                    .filter(|(_, fate)| fate.edits.iter().any(|e| needle.matches(&e.text)))
                    .map(|(message, _)| message.clone())
                    .collect();
                let mut hot = HotQuery {
                    any_of: vec![needle.terms().iter().cloned().collect()],
                    also: HashMap::new(),
                };
                for (conv, seq) in &edited {
                    hot.also.entry(conv.clone()).or_default().push(*seq);
                }
                let indexed =
                    IndexedText::new(&*self.store, tenant, needle.clone(), edited).await?;
                (Some(indexed), Some(hot))
            }
            _ => (None, None),
        };
        let sel = Selection {
            conv: query.conv.as_ref(),
            sender: query.sender.as_ref(),
            from_ms: query.from_ms,
            to_ms: query.to_ms,
            kinds: needle.is_some().then_some(TEXT_KINDS),
            text: indexed.as_ref(),
            hot: hot.as_ref(),
        };
        let mut emit = Emit {
            fates: fates.0,
            needle,
            sink,
            progress,
        };
        scanner.scan(tenant, sel, &mut emit).await
    }
}

#[derive(Default)]
struct Fates(HashMap<(String, u64), Fate>);

#[async_trait::async_trait]
impl Visitor for Fates {
    async fn visit(&mut self, events: Vec<Event>, _tier: Tier) -> Result<(), ComplianceError> {
        for e in events {
            match e.body {
                Some(Body::MessageEdited(x)) => {
                    let fate = self.0.entry((e.conversation, x.target_seq)).or_default();
                    fate.edits.push(Edit {
                        seq: e.seq,
                        time_ms: e.server_time_ms,
                        sender: e.sender,
                        text: x.new_text,
                    });
                    // Archive first, then hot: keep each message's edits in seq order.
                    fate.edits.sort_by_key(|e| e.seq);
                }
                Some(Body::MessageRecalled(x)) => {
                    self.0
                        .entry((e.conversation, x.target_seq))
                        .or_default()
                        .recall = Some(Recall {
                        seq: e.seq,
                        time_ms: e.server_time_ms,
                        sender: e.sender,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }
}

struct Emit<'a> {
    fates: HashMap<(String, u64), Fate>,
    /// The text filter.
    needle: Option<Needle>,
    sink: &'a mut dyn Sink,
    progress: &'a Progress,
}

#[async_trait::async_trait]
impl Visitor for Emit<'_> {
    async fn visit(&mut self, events: Vec<Event>, tier: Tier) -> Result<(), ComplianceError> {
        for event in events {
            let fate = matches!(event.body, Some(Body::MessagePosted(_))).then(|| {
                self.fates
                    .get(&(event.conversation.clone(), event.seq))
                    .cloned()
                    .unwrap_or_default()
            });
            let matched = match &self.needle {
                None => None,
                Some(needle) => {
                    if event_text(&event).is_some_and(|t| needle.matches(t)) {
                        Some("original")
                    } else if fate
                        .as_ref()
                        .is_some_and(|f| f.edits.iter().any(|e| needle.matches(&e.text)))
                    {
                        Some("edit")
                    } else {
                        continue;
                    }
                }
            };
            self.progress.hits.fetch_add(1, Ordering::Relaxed);
            self.sink
                .hit(Hit {
                    event,
                    tier,
                    fate,
                    matched,
                })
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tidings_log::search::Needle;

    fn matches(text: &str, query: &str) -> bool {
        Needle::new(query).expect("query").matches(text)
    }

    #[test]
    fn text_match_ignores_case_in_any_script() {
        assert!(matches("Quarterly FORECAST attached", "forecast"));
        assert!(matches("forecast", "forecast"));
        assert!(!matches("fore cast", "forecast"));
        assert!(!matches("", "x"));
        assert!(matches("STRASSE und Ärger", "ärger"));
        assert!(matches("ΣΟΦΙΑ", "σοφια"));
    }
}
