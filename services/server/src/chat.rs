//! `tidings chat`: a terminal client. On joining it prints the conversation's latest events
//! (`--history N`), then each stdin line is sent as a message and every new event of the
//! conversation is printed as one JSON line, in seq order, once — gaps are pulled.
//!
//! History and live events meet at the head that Sync reports after Welcome: history is read
//! up to that seq, live pushes are taken after it. The gateway subscribes the session before
//! it sends Welcome, so every event past that head is pushed, and the tracker drops any that
//! history already showed.

use std::collections::BTreeMap;

use anyhow::Context;
use tidings_client::{Connection, Push, Requester, Seen, Tracker};
use tidings_schemas::v1::Event;
use tokio::io::AsyncBufReadExt;

use crate::output;

/// Prints events in order, pulling whatever is missing before one.
async fn show(
    requester: &Requester,
    tracker: &mut Tracker,
    conv: &str,
    event: tidings_client::client::server_frame::Msg,
) -> anyhow::Result<()> {
    let tidings_client::client::server_frame::Msg::Event(event) = event else {
        return Ok(());
    };
    if event.conversation != conv {
        return Ok(());
    }
    match tracker.observe(&event) {
        Seen::Duplicate => {}
        Seen::New => println!("{}", output::event(&event)),
        Seen::Gap { from, to } => {
            let mut missing: BTreeMap<u64, _> = BTreeMap::new();
            let mut next = from;
            while next <= to {
                let page = requester.pull(conv, next, to).await?;
                let Some(last) = page.events.last().map(|e| e.seq) else {
                    break;
                };
                for e in page.events {
                    missing.insert(e.seq, e);
                }
                next = last + 1;
            }
            missing.insert(event.seq, event);
            for e in missing.values() {
                if tracker.observe(e) == Seen::New {
                    println!("{}", output::event(e));
                }
            }
        }
    }
    Ok(())
}

/// The `n` events up to and including `head`, oldest first, paged back with History (the
/// server caps each page at its read limit). Fewer when the conversation is shorter.
async fn history(
    requester: &Requester,
    conv: &str,
    head: u64,
    n: u32,
) -> anyhow::Result<Vec<Event>> {
    let mut pages: Vec<Vec<Event>> = Vec::new();
    let mut wanted = n;
    let mut before = head + 1;
    while wanted > 0 && before > 1 {
        let page = requester.history(conv, before, wanted).await?.events;
        let Some(oldest) = page.first().map(|e| e.seq) else {
            break;
        };
        debug_assert!(page.last().is_some_and(|e| e.seq < before));
        wanted = wanted.saturating_sub(u32::try_from(page.len()).unwrap_or(u32::MAX));
        before = oldest;
        pages.push(page);
    }
    Ok(pages.into_iter().rev().flatten().collect())
}

/// Joins `conv`, prints its last `history_len` events, then chats until stdin ends and
/// every message sent has come back.
pub async fn run(
    url: &str,
    tls: &tidings_client::ClientTls,
    token: &str,
    conv: &str,
    history_len: u32,
) -> anyhow::Result<bool> {
    let (mut conn, welcome) = Connection::open_with(url, tls, token, "tidings-chat")
        .await
        .with_context(|| format!("connect to {url}"))?;
    eprintln!(
        "tidings chat: {} in {} as {}; type a line to send it, Ctrl-D to quit",
        conv, welcome.tenant, welcome.user
    );
    let requester = conn.requester();
    let mut tracker = Tracker::default();
    // The head after Welcome splits what is shown as history from what comes live.
    let sync = requester.sync(&[], 1).await?;
    let Some(state) = sync.conversations.iter().find(|s| s.conversation == conv) else {
        anyhow::bail!("{} is not a member of {conv}", welcome.user);
    };
    if let Some(e) = &state.error {
        anyhow::bail!("{conv} cannot be read right now: {}", e.message);
    }
    let head = state.head_seq;
    for e in history(&requester, conv, head, history_len).await? {
        println!("{}", output::event(&e));
    }
    tracker.advance(conv, head);

    // Sending runs beside receiving; sends are sequential so they keep the input's order.
    let sender = requester.clone();
    let conv_owned = conv.to_string();
    let mut sends = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        let mut last_seq = 0;
        while let Some(line) = lines.next_line().await.context("read stdin")? {
            if line.trim().is_empty() {
                continue;
            }
            let id = uuid::Uuid::now_v7().to_string();
            let ack = sender.send_text(&conv_owned, &id, &line).await?;
            last_seq = ack.seq;
        }
        anyhow::Ok(last_seq)
    });
    let mut sent_up_to: Option<u64> = None;
    loop {
        if let Some(seq) = sent_up_to
            && tracker.last(conv) >= seq
        {
            return Ok(true); // input done and every message we sent has come back
        }
        tokio::select! {
            done = &mut sends, if sent_up_to.is_none() => {
                let seq = done.context("sender task")??;
                sent_up_to = Some(seq);
            }
            push = conn.next_push() => match push {
                Some(Push::Event(e)) => {
                    show(&requester, &mut tracker, conv, tidings_client::client::server_frame::Msg::Event(e)).await?;
                }
                Some(Push::Goodbye(g)) => {
                    anyhow::bail!("the server closed the session: {}", g.message);
                }
                Some(Push::Closed { code, reason }) => {
                    anyhow::bail!("connection closed (code {code:?}) {reason}");
                }
                None => anyhow::bail!("connection closed"),
                _ => {}
            }
        }
    }
}
