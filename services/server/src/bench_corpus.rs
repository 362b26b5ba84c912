//! What `tidings bench archive` and `tidings bench compliance` share: the chat corpus they
//! generate and append, and the plaintext Parquet baseline they compare the archive with.
//!
//! - [`vocabulary`] and [`chat_text`]: messages of 2 to 30 words drawn Zipf-like from common
//!   words and 4,000 made-up ones, so they compress like chat rather than like noise or like
//!   repeated text.
//! - [`Corpus`]: group conversations of one tenant, and [`append_pipelined`], which appends
//!   through the log with thousands of appends in flight, as a busy server would.
//! - [`archive_all`]: one archive pass that takes every event, into a local object store.
//! - [`PlainSegment`]: an archived segment read whole with its bodies opened, and
//!   [`PlainSegment::write_plain`]: the same rows as plaintext Parquet through the same
//!   writer, schema and row groups, only the body column in the clear.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tidings_archive::format::{self, Body, Fetched, Footer, WriteOptions};
use tidings_archive::reader::Segment;
use tidings_archive::{ArchiveConfig, Archiver, Objects, PassOptions, StorageConfig};
use tidings_log::crypto::Keyring;
use tidings_log::store::KvStore;
use tidings_log::{
    Append, ClientMsgId, Committed, ConvId, CreateConversation, Log, TenantId, UserId,
};

/// Appends in flight at once in [`append_pipelined`]: enough to fill the sequencer's groups.
const IN_FLIGHT: usize = 4096;

const WORDS: &[&str] = &[
    "the",
    "a",
    "to",
    "and",
    "I",
    "you",
    "it",
    "is",
    "we",
    "for",
    "on",
    "in",
    "that",
    "this",
    "can",
    "will",
    "be",
    "have",
    "do",
    "with",
    "at",
    "ok",
    "thanks",
    "yes",
    "no",
    "just",
    "so",
    "meeting",
    "today",
    "tomorrow",
    "deploy",
    "release",
    "build",
    "review",
    "PR",
    "merged",
    "ticket",
    "customer",
    "call",
    "lunch",
    "later",
    "now",
    "please",
    "check",
    "looks",
    "good",
    "great",
    "sorry",
    "late",
    "minutes",
    "update",
    "status",
    "blocked",
    "fixed",
    "bug",
    "test",
    "tests",
    "failing",
    "green",
    "prod",
    "staging",
    "rollback",
    "numbers",
    "quarterly",
    "report",
    "slides",
    "deck",
    "draft",
    "send",
    "sent",
    "email",
    "invoice",
    "contract",
    "legal",
    "budget",
    "Q3",
    "Q4",
    "plan",
    "roadmap",
    "design",
    "doc",
    "link",
    "here",
    "there",
    "what",
    "why",
    "when",
    "who",
    "how",
    "about",
    "agree",
    "think",
    "maybe",
    "probably",
    "should",
    "could",
    "need",
    "want",
    "let's",
    "team",
    "sync",
    "standup",
    "1:1",
    "offsite",
    "travel",
    "flight",
    "hotel",
    "Berlin",
    "Tokyo",
    "Paris",
    "Monday",
    "Friday",
    "week",
    "weekend",
    "EOD",
    "ETA",
    "asap",
    "FYI",
    "lgtm",
    "nice",
    "cool",
    "haha",
    "wow",
    "interesting",
    "question",
    "answer",
];

/// The vocabulary: the common words above, then 4,000 made-up ones (names, jargon, typos)
/// built from syllables, so texts have the long tail real chat has.
pub fn vocabulary() -> Vec<String> {
    const SYLLABLES: &[&str] = &[
        "ka", "lo", "mi", "ter", "an", "zu", "pre", "sto", "vel", "ri", "on", "ex", "qua", "dis",
        "ment", "ly", "ing", "ed", "co", "nu", "bra", "shi", "tor", "ga",
    ];
    let mut rng = fastrand::Rng::with_seed(42);
    let mut words: Vec<String> = WORDS.iter().map(|w| w.to_string()).collect();
    for _ in 0..4000 {
        let n = 2 + rng.usize(..3);
        words.push(
            (0..n)
                .map(|_| SYLLABLES[rng.usize(..SYLLABLES.len())])
                .collect(),
        );
    }
    words
}

/// A chat message: `2..=30` words, common words far likelier than rare ones (a uniform
/// index cubed: Zipf-like), now and then a number.
pub fn chat_text(rng: &mut fastrand::Rng, vocabulary: &[String]) -> String {
    let n = 2 + rng.usize(..29).min(rng.usize(..29));
    let mut words = Vec::with_capacity(n);
    for _ in 0..n {
        let r = rng.f64();
        let i = ((r * r * r) * vocabulary.len() as f64) as usize;
        words.push(vocabulary[i.min(vocabulary.len() - 1)].clone());
    }
    if rng.u8(..10) == 0 {
        words.push(rng.u32(..100_000).to_string());
    }
    words.join(" ")
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Group conversations `c00000`, `c00001`, ... of tenant `bench`, each with every user as a
/// member (`user0` created them).
pub struct Corpus {
    pub tenant: TenantId,
    pub convs: Vec<ConvId>,
    pub users: Vec<UserId>,
}

impl Corpus {
    pub async fn create(log: &Log, conversations: usize, users: usize) -> anyhow::Result<Corpus> {
        anyhow::ensure!(users > 0, "a corpus needs users");
        let tenant = TenantId::new("bench")?;
        let convs: Vec<ConvId> = (0..conversations)
            .map(|i| ConvId::new(format!("c{i:05}")))
            .collect::<Result<_, _>>()?;
        let users: Vec<UserId> = (0..users)
            .map(|i| UserId::new(format!("user{i}")))
            .collect::<Result<_, _>>()?;
        for conv in &convs {
            log.create_conversation(CreateConversation {
                tenant: tenant.clone(),
                conv: conv.clone(),
                kind: "group".into(),
                title: conv.to_string(),
                creator: users[0].clone(),
                members: users[1..].to_vec(),
            })
            .await?;
        }
        Ok(Corpus {
            tenant,
            convs,
            users,
        })
    }

    /// A message from a random user in a random conversation, its text from `text` (drawn
    /// after the conversation and the sender, from the same generator).
    pub fn message(
        &self,
        rng: &mut fastrand::Rng,
        text: impl FnOnce(&mut fastrand::Rng) -> String,
    ) -> anyhow::Result<Append> {
        let conv = self.convs[rng.usize(..self.convs.len())].clone();
        let sender = self.users[rng.usize(..self.users.len())].clone();
        Ok(Append::text(
            self.tenant.clone(),
            conv,
            sender,
            client_msg_id()?,
            text(rng),
        ))
    }
}

/// A fresh client message id, as a client would make one.
pub fn client_msg_id() -> anyhow::Result<ClientMsgId> {
    Ok(ClientMsgId::new(uuid::Uuid::now_v7().to_string())?)
}

/// Appends `requests` in order with up to `IN_FLIGHT` waiting for their acks, and calls
/// `committed` with each one's position in `requests` and its ack, in order. Returns how
/// many were appended.
pub async fn append_pipelined(
    log: &Log,
    requests: impl IntoIterator<Item = anyhow::Result<Append>>,
    mut committed: impl FnMut(usize, Committed),
) -> anyhow::Result<usize> {
    let mut pending = Vec::with_capacity(IN_FLIGHT);
    let mut done = 0;
    let mut requests = requests.into_iter().peekable();
    while let Some(req) = requests.next() {
        pending.push(log.enqueue(req?).await?);
        if pending.len() == IN_FLIGHT || requests.peek().is_none() {
            for p in pending.drain(..) {
                committed(done, p.wait().await?);
                done += 1;
            }
        }
    }
    Ok(done)
}

/// Archives every event of the store in one pass (`tidings archive run --older-than 0s`)
/// into a local object store at `root`, checking that exactly `events` moved. Returns the
/// object store and how long the pass took.
pub async fn archive_all(
    store: &Arc<dyn KvStore>,
    log: &Log,
    root: &Path,
    cfg: &ArchiveConfig,
    events: u64,
) -> anyhow::Result<(Objects, Duration)> {
    let objects = Objects::open(&StorageConfig::Local {
        root: root.to_path_buf(),
    })?;
    let archiver = Archiver::new(
        store.clone(),
        log.keyring().clone(),
        objects.clone(),
        cfg.clone(),
    )?;
    // The pass takes events strictly older than its start: let the last append age.
    tokio::time::sleep(Duration::from_millis(2)).await;
    let started = Instant::now();
    let summary = archiver
        .run_pass(
            &PassOptions {
                older_than_ms: Some(0),
                ..PassOptions::default()
            },
            &|_| {},
        )
        .await?;
    let took = started.elapsed();
    anyhow::ensure!(
        summary.events_archived == events,
        "archived {} of {events} events",
        summary.events_archived
    );
    Ok((objects, took))
}

/// An archived segment fetched whole, its footer checked and its rows read with their
/// bodies opened: `rows[i].body` is the plaintext payload (the protobuf `Event` with only
/// its body set), exactly what the archiver sealed.
pub struct PlainSegment {
    pub segment: Segment,
    pub data: Fetched,
    pub rows: Vec<format::Row>,
}

impl PlainSegment {
    pub async fn read(
        objects: &Objects,
        path: &str,
        tenant: &TenantId,
        keyring: &Keyring,
    ) -> anyhow::Result<PlainSegment> {
        let data = Fetched::whole(objects.get(path).await?);
        let segment = Segment::open(path, Footer::parse(&data)?, tenant, keyring).await?;
        let footer = &segment.footer;
        let mut rows = Vec::with_capacity(footer.rows() as usize);
        for rg in 0..footer.meta.num_row_groups() {
            let n = footer.meta.row_group(rg).num_rows() as usize;
            rows.extend(format::read_rows(footer, &data, rg, 0, n, true)?);
        }
        let opened = segment.open_rows(path, keyring, &rows).await?;
        for (row, event) in rows.iter_mut().zip(&opened) {
            row.body = tidings_archive::codec::payload(event);
        }
        Ok(PlainSegment {
            segment,
            data,
            rows,
        })
    }

    /// The rows as plaintext Parquet: the archiver's writer, schema, row groups and ZSTD
    /// level (`cfg`), with the body column in the clear and compressed like the others.
    pub fn write_plain(&self, cfg: &ArchiveConfig) -> anyhow::Result<Vec<u8>> {
        format::write_segment(
            self.segment.tenant.as_str(),
            &self.rows,
            &WriteOptions {
                row_group_rows: cfg.row_group_events,
                zstd_level: cfg.zstd_level,
                body: Body::Plain,
                metadata: Vec::new(),
            },
        )
        .context("write plaintext Parquet")
    }
}
