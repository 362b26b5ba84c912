//! `tidings chat`: a terminal client. Each stdin line is sent as a message; every event of
//! the conversation is printed as one JSON line, in seq order, once — gaps are pulled.

use std::collections::BTreeMap;

use anyhow::Context;
use tidings_client::{Connection, Push, Requester, Seen, Tracker};
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

pub async fn run(url: &str, token: &str, conv: &str) -> anyhow::Result<bool> {
    let (mut conn, welcome) = Connection::open(url, token, "tidings-chat")
        .await
        .with_context(|| format!("connect to {url}"))?;
    eprintln!(
        "tidings chat: {} in {} as {}; type a line to send it, Ctrl-D to quit",
        conv, welcome.tenant, welcome.user
    );
    let requester = conn.requester();
    let mut tracker = Tracker::default();
    // Start at the head: what follows is new. (History: `tidings log read` or History.)
    let sync = requester.sync(&[], 1).await?;
    let Some(state) = sync.conversations.iter().find(|s| s.conversation == conv) else {
        anyhow::bail!("{} is not a member of {conv}", welcome.user);
    };
    if let Some(e) = &state.error {
        anyhow::bail!("{conv} cannot be read right now: {}", e.message);
    }
    tracker.advance(conv, state.head_seq);

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
