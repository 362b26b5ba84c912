//! The send buffer on a JetStream stream, the medium for log writers on several hosts
//! (docs/decisions/send-buffer.md): the whole KV-outage suite (`outage_suite/`, also run with
//! files by `services/log/tests/outage.rs`) against a real nats-server, each writer on a
//! connection of its own as writers on different hosts would be; then the stream's own
//! claims, on the medium directly: fencing between epochs, a trim that never purges a later
//! owner's records, records larger than the server's `max_payload` split and joined, and a
//! record whose append stopped halfway left out.

#[macro_use]
#[path = "../services/log/tests/outage_suite/mod.rs"]
mod outage_suite;

use std::sync::Arc;
use std::time::Duration;

use crate::common;
use tidings_log::send_buffer::{AppendRefused, BufferPlace, Medium};
use tidings_log_role::send_buffer_stream::{StreamBuffer, StreamBufferConfig};

fn stream_config() -> StreamBufferConfig {
    StreamBufferConfig {
        replicas: 1,
        max_bytes: 1 << 30,
        ack_timeout: Duration::from_secs(10),
    }
}

async fn medium(url: &str) -> StreamBuffer {
    let client = async_nats::connect(url).await.expect("connect to nats");
    StreamBuffer::open(client, stream_config())
        .await
        .expect("open the stream")
}

async fn on_stream() -> (outage_suite::Places, common::Nats) {
    let nats = common::Nats::start();
    let url = nats.url();
    let places: outage_suite::Places = Arc::new(move |_dir: &std::path::Path| {
        let url = url.clone();
        Box::pin(async move { BufferPlace::Medium(Arc::new(medium(&url).await)) })
    });
    (places, nats)
}

mod suite {
    use super::*;
    outage_suite!(on_stream());
}

fn records(tag: u8, n: usize, len: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| vec![tag ^ i as u8; len]).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_fence_each_other_and_a_trim_keeps_a_later_owners_records() {
    let nats = common::Nats::start();
    let (a, b, stale) = (
        medium(&nats.url()).await,
        medium(&nats.url()).await,
        medium(&nats.url()).await,
    );
    assert!(a.adopt(7, 4).await.expect("adopt").is_empty());
    a.append(7, 4, records(1, 3, 100)).await.expect("append");
    // A second partition is independent.
    assert!(a.adopt(8, 4).await.expect("adopt").is_empty());
    a.append(8, 4, records(9, 1, 10)).await.expect("append");

    // B adopts with a later epoch: it gets A's records, and A can append no more.
    assert_eq!(b.adopt(7, 5).await.expect("adopt"), records(1, 3, 100));
    match a.append(7, 4, records(2, 1, 10)).await {
        Err(AppendRefused::Fenced { epoch: 5 }) => {}
        other => panic!("A must be fenced by epoch 5, got {other:?}"),
    }
    // A writer of an earlier epoch adopting late loads what is there but cannot append.
    assert_eq!(stale.adopt(7, 3).await.expect("adopt").len(), 3);
    match stale.append(7, 3, records(3, 1, 10)).await {
        Err(AppendRefused::Fenced { epoch: 5 }) => {}
        other => panic!("a stale epoch must be fenced, got {other:?}"),
    }
    b.append(7, 5, records(4, 2, 50)).await.expect("B appends");
    // A's late trim (it replayed before losing the partition) purges nothing of B's.
    a.trim(7, 4).await.expect("trim");
    let mut expected = records(1, 3, 100);
    expected.extend(records(4, 2, 50));
    assert_eq!(
        medium(&nats.url()).await.adopt(7, 6).await.expect("adopt"),
        expected
    );
    assert_eq!(
        medium(&nats.url()).await.adopt(8, 6).await.expect("adopt"),
        records(9, 1, 10)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_trims_what_it_replayed_and_keeps_appending() {
    let nats = common::Nats::start();
    let a = medium(&nats.url()).await;
    a.adopt(0, 1).await.expect("adopt");
    a.append(0, 1, records(1, 5, 10)).await.expect("append");
    a.trim(0, 1).await.expect("trim");
    a.append(0, 1, records(2, 1, 10))
        .await
        .expect("append after a trim");
    assert_eq!(
        medium(&nats.url()).await.adopt(0, 2).await.expect("adopt"),
        records(2, 1, 10)
    );
    // However often an empty partition changes hands, its subject keeps one marker.
    let subject_messages = || async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let mut stream = async_nats::jetstream::new(client)
            .get_stream("TIDINGS_SEND_BUFFER")
            .await
            .expect("stream");
        stream.info().await.expect("info").state.messages
    };
    let before = subject_messages().await;
    for epoch in 10..15 {
        let b = medium(&nats.url()).await;
        assert!(b.adopt(1, epoch).await.expect("adopt").is_empty());
    }
    assert_eq!(subject_messages().await, before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_over_max_payload_are_split_and_a_torn_one_is_left_out() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("nats.conf");
    std::fs::write(&config, "max_payload: 65536\n").expect("write config");
    let nats = common::Nats::start_with(Some(&config), "nats");
    let a = medium(&nats.url()).await;
    a.adopt(2, 1).await.expect("adopt");
    // 200 KB: four parts of at most 64 KiB less the room for headers.
    let big = records(5, 2, 200_000);
    a.append(2, 1, big.clone()).await.expect("append");

    // An append that stopped after its first part (the writer died mid-record): written by
    // hand, as the medium would have.
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let subject = "tidings.sendbuf.p00002";
    let last = js
        .get_stream("TIDINGS_SEND_BUFFER")
        .await
        .expect("stream")
        .get_last_raw_message_by_subject(subject)
        .await
        .expect("last")
        .sequence;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Tidings-Epoch", "1");
    headers.insert("Tidings-Part", "1/3");
    js.send_publish(
        subject,
        async_nats::jetstream::message::PublishMessage::build()
            .headers(headers)
            .payload(vec![7u8; 1000].into())
            .expected_last_subject_sequence(last),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");

    assert_eq!(
        medium(&nats.url()).await.adopt(2, 2).await.expect("adopt"),
        big
    );
}

/// With three replicas on a three-server cluster, the buffer outlives a server, even the one
/// leading the stream: the writer appends again once the other two elect a leader, and a
/// writer on another server adopts every record, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_three_replicas_the_buffer_outlives_a_nats_server() {
    let dir = tempfile::tempdir().expect("dir");
    let routes: Vec<u16> = (0..3).map(|_| common::free_port()).collect();
    let mut nodes: Vec<common::Nats> = (0..3)
        .map(|i| {
            let others: Vec<String> = (0..3)
                .filter(|j| *j != i)
                .map(|j| format!("nats-route://127.0.0.1:{}", routes[j]))
                .collect();
            let config = dir.path().join(format!("n{i}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: n{i}\ncluster {{ name: buffer-test\n listen: 127.0.0.1:{}\n \
                     routes: [{}] }}\n",
                    routes[i],
                    others.join(", ")
                ),
            )
            .expect("write config");
            common::Nats::start_with(Some(&config), "nats")
        })
        .collect();
    let cfg = StreamBufferConfig {
        replicas: 3,
        ..stream_config()
    };
    let open = |url: String| {
        let cfg = cfg.clone();
        async move {
            // The cluster elects its JetStream leader first: retry until the stream is made.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let client = async_nats::connect(&url).await.expect("connect");
                match StreamBuffer::open(client, cfg.clone()).await {
                    Ok(m) => return m,
                    Err(e) => {
                        assert!(tokio::time::Instant::now() < deadline, "no R3 stream: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    };
    let a = open(nodes[0].url()).await;
    a.adopt(0, 1).await.expect("adopt");
    a.append(0, 1, records(1, 4, 100)).await.expect("append");

    // The stream is on all three servers; stop the one that leads it.
    let client = async_nats::connect(nodes[0].url()).await.expect("connect");
    let info = async_nats::jetstream::new(client)
        .get_stream("TIDINGS_SEND_BUFFER")
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .clone();
    assert_eq!(info.config.num_replicas, 3);
    let cluster = info.cluster.expect("clustered");
    assert_eq!(cluster.replicas.len(), 2, "two followers beside the leader");
    let leader = cluster.leader.expect("a stream leader");
    let victim: usize = leader.trim_start_matches('n').parse().expect("n0..n2");
    nodes[victim].kill();

    // Appends fail until the other two elect a leader (each failure is voided), then land.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match a.append(0, 1, records(2, 2, 100)).await {
            Ok(()) => break,
            Err(AppendRefused::Io(e)) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no append after losing the leader: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    let survivor = (0..3).find(|i| *i != victim).expect("survivor");
    let b = open(nodes[survivor].url()).await;
    let mut expected = records(1, 4, 100);
    expected.extend(records(2, 2, 100));
    assert_eq!(b.adopt(0, 2).await.expect("adopt"), expected);
}

/// An append that fails after part of it landed (here: its second record does not fit the
/// stream's cap) counts for nothing: its seqs are handed out again, so the next append voids
/// what landed, and an adopter never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_landed_of_a_failed_append_is_voided() {
    let nats = common::Nats::start();
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let a = StreamBuffer::open(
        client,
        StreamBufferConfig {
            max_bytes: 64 * 1024,
            ..stream_config()
        },
    )
    .await
    .expect("open");
    a.adopt(3, 1).await.expect("adopt");
    a.append(3, 1, records(1, 1, 1000)).await.expect("append");
    let mut failed = records(2, 1, 10_000);
    failed.extend(records(3, 1, 100_000));
    match a.append(3, 1, failed).await {
        Err(AppendRefused::Io(_)) => {}
        other => panic!("the second record cannot fit, got {other:?}"),
    }
    a.append(3, 1, records(4, 1, 1000)).await.expect("append");
    let mut expected = records(1, 1, 1000);
    expected.extend(records(4, 1, 1000));
    let got = medium(&nats.url()).await.adopt(3, 2).await.expect("adopt");
    let lengths = |r: &[Vec<u8>]| r.iter().map(|r| (r[0], r.len())).collect::<Vec<_>>();
    assert_eq!(lengths(&got), lengths(&expected));
    assert_eq!(got, expected);
}
