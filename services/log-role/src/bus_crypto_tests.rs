//! The sealed bus with the log's real keyring: keys derived, rotated and shredded as the
//! log does it ([`tidings_log_api::bus_crypto`]).

use prost::Message;
use tidings_log::crypto::{Keyring, MasterKey};
use tidings_log::store::FjallStore;
use tidings_log_api::bus_crypto::*;
use tidings_log_api::crypto::hex_decode;
use tidings_log_api::{ConvId, Event, TenantId};

async fn keys() -> (Keyring, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tmp");
    let store = FjallStore::open(dir.path()).expect("store");
    let ring = Keyring::open(std::sync::Arc::new(store), MasterKey::generate())
        .await
        .expect("keyring");
    (ring, dir)
}

fn ids() -> (TenantId, ConvId) {
    (
        TenantId::new("acme").expect("id"),
        ConvId::new("general").expect("id"),
    )
}

fn event(t: &TenantId, c: &ConvId, seq: u64) -> Event {
    Event {
        tenant: t.to_string(),
        conversation: c.to_string(),
        seq,
        ..Default::default()
    }
}

#[tokio::test]
async fn sealed_event_opens_only_for_its_tenant_conversation_seq_and_key() {
    let (ring, _dir) = keys().await;
    let (t, c) = ids();
    let key = ring.transport_key(&t, None).await.expect("key");
    let bytes = event(&t, &c, 7).encode_to_vec();
    let payload = seal_event(&key, &c, 7, &bytes);
    let env = envelope(&payload).expect("envelope");
    assert_eq!((env.key_id, env.seq), (key.id, 7));
    let (opened, plain) = open_event(&key, &c, &env).expect("opens");
    assert_eq!(opened, event(&t, &c, 7));
    assert_eq!(plain, bytes, "the sealed bytes, as they were");

    let other_conv = ConvId::new("random").expect("id");
    assert!(open_event(&key, &other_conv, &env).is_err(), "other conv");
    let mut moved = env.clone();
    moved.seq = 8;
    assert!(open_event(&key, &c, &moved).is_err(), "other seq");
    let globex = TenantId::new("globex").expect("id");
    let globex_key = ring.transport_key(&globex, None).await.expect("key");
    assert!(open_event(&globex_key, &c, &env).is_err(), "other tenant");
    let rotated = ring.rotate(&t).await.expect("rotate");
    let new_key = ring.transport_key(&t, Some(rotated)).await.expect("key");
    let mut relabelled = env.clone();
    relabelled.key_id = rotated;
    assert!(
        open_event(&new_key, &c, &relabelled).is_err(),
        "other key id"
    );
    // The old id is still derivable after rotation: events in flight still open.
    let old = ring.transport_key(&t, Some(key.id)).await.expect("old key");
    assert!(open_event(&old, &c, &env).is_ok());
    let mut flipped = env.clone();
    flipped.sealed[0] ^= 1;
    assert!(open_event(&key, &c, &flipped).is_err(), "altered");
}

#[tokio::test]
async fn rpc_payload_opens_only_with_its_nonce_direction_and_tenant() {
    let (ring, _dir) = keys().await;
    let (t, _) = ids();
    let key = ring.transport_key(&t, None).await.expect("key");
    let n = nonce();
    let sealed = seal_rpc(&key, Direction::Request, &n, b"a call");
    assert_eq!(
        open_rpc(&key, Direction::Request, &n, &sealed).expect("open"),
        b"a call"
    );
    assert!(open_rpc(&key, Direction::Reply, &n, &sealed).is_err());
    assert!(open_rpc(&key, Direction::Request, &nonce(), &sealed).is_err());
    let globex = TenantId::new("globex").expect("id");
    let globex_key = ring.transport_key(&globex, None).await.expect("key");
    assert!(open_rpc(&globex_key, Direction::Request, &n, &sealed).is_err());
}

#[tokio::test]
async fn exchange_delivers_the_key_to_the_gateway_only() {
    let (ring, _dir) = keys().await;
    let (t, _) = ids();
    let key = ring.transport_key(&t, None).await.expect("key");
    let log = LogIdentity::new(ring.log_identity_secret());
    let pinned = LogPublicKey::of_secret(&ring.log_identity_secret());
    assert_eq!(log.public_key(), pinned);
    let gateway = Exchange::new(&pinned).expect("exchange");
    let reply = log.answer(&key, &gateway.public_key()).expect("answer");
    let raw = key.secret_bytes_for_tests();
    let wire = reply.encode_to_vec();
    assert!(!wire.windows(16).any(|w| raw.windows(16).any(|r| r == w)));
    // Someone else's exchange cannot open it.
    let eavesdropper = Exchange::new(&pinned).expect("exchange");
    assert!(eavesdropper.finish(&t, &reply).is_err());
    let got = gateway.finish(&t, &reply).expect("finish");
    assert!(got.same_secret(&key));
    assert_eq!(got.id, key.id);
    // A low-order point is refused.
    assert!(log.answer(&key, &[0u8; 32]).is_err());
}

#[tokio::test]
async fn only_the_pinned_log_can_answer_an_exchange() {
    let (ring, _dir) = keys().await;
    let (t, _) = ids();
    let pinned = LogPublicKey::of_secret(&ring.log_identity_secret());
    // An impostor who can publish on NATS, with a key of its own making, answers with
    // its own identity: refused for not being pinned.
    let impostor = LogIdentity::new([9u8; 32]);
    let (other_ring, _other_dir) = keys().await;
    let fake = other_ring.transport_key(&t, None).await.expect("key");
    let gateway = Exchange::new(&pinned).expect("exchange");
    let reply = impostor
        .answer(&fake, &gateway.public_key())
        .expect("answer");
    let err = gateway.finish(&t, &reply).expect_err("not pinned");
    assert!(
        err.to_string().contains("not from the log identity"),
        "{err}"
    );
    // ...and claiming the pinned public key does not help: the key does not open.
    let gateway = Exchange::new(&pinned).expect("exchange");
    let mut reply = impostor
        .answer(&fake, &gateway.public_key())
        .expect("answer");
    reply.public_key = hex_decode(&pinned.to_hex()).expect("hex");
    let err = gateway.finish(&t, &reply).expect_err("does not open");
    assert!(err.to_string().contains("does not open"), "{err}");
}

#[tokio::test]
async fn a_sealed_token_opens_for_the_log_and_only_for_its_tenant() {
    let (ring, _dir) = keys().await;
    let (t, _) = ids();
    let log = LogIdentity::new(ring.log_identity_secret());
    let gateway = Exchange::new(&log.public_key()).expect("exchange");
    let sealed = gateway.seal_token(&t, "header.claims.signature");
    assert!(!sealed.windows(6).any(|w| w == b"claims"));
    assert_eq!(
        log.open_token(&t, &gateway.public_key(), &sealed)
            .expect("open"),
        "header.claims.signature"
    );
    let globex = TenantId::new("globex").expect("id");
    assert!(
        log.open_token(&globex, &gateway.public_key(), &sealed)
            .is_err()
    );
    let other = Exchange::new(&log.public_key()).expect("exchange");
    assert!(log.open_token(&t, &other.public_key(), &sealed).is_err());
    assert!(
        LogIdentity::new([9u8; 32])
            .open_token(&t, &gateway.public_key(), &sealed)
            .is_err()
    );
}

#[test]
fn log_public_keys_parse_from_hex_only() {
    let k = LogPublicKey::of_secret(&[5u8; 32]);
    assert_eq!(LogPublicKey::from_hex(&k.to_hex()).expect("parse"), k);
    assert!(LogPublicKey::from_hex("abcd").is_err());
    assert!(LogPublicKey::from_hex(&"zz".repeat(32)).is_err());
}

#[tokio::test]
async fn shredded_tenant_has_no_transport_key() {
    let (ring, _dir) = keys().await;
    let (t, _) = ids();
    ring.transport_key(&t, None).await.expect("key");
    ring.shred(&t).await.expect("shred");
    let err = ring.transport_key(&t, None).await.expect_err("shredded");
    assert_eq!(err.code(), "tenant_shredded");
    let err = ring.transport_key(&t, Some(1)).await.expect_err("shredded");
    assert_eq!(err.code(), "tenant_shredded");
}

#[tokio::test]
async fn key_cache_is_bounded_and_fetches_once() {
    let cache = KeyCache::default();
    let (ring, _dir) = keys().await;
    let (t, _) = ids();
    let fetches = std::sync::atomic::AtomicUsize::new(0);
    for _ in 0..3 {
        cache
            .get(&t, None, || async {
                fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                ring.transport_key(&t, None).await
            })
            .await
            .expect("key");
    }
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
    let wrong = cache
        .get(&t, Some(9), || async { ring.transport_key(&t, None).await })
        .await;
    assert!(wrong.is_err(), "a key of another id than asked is refused");
    assert_eq!(cache.len(), 1);
}
