//! Conversation kinds and role policies (issue 16), in process on a fjall store on disk:
//! every rule of every built-in kind, allowed and refused, enforced by the sequencer with a
//! typed error and nothing written on a refusal; the rules the issue names, spelled out; the
//! rename bug fixed; a kind defined by configuration alone.

use std::collections::HashMap;
use std::sync::Arc;

use tidings_log::crypto::MasterKey;
use tidings_log::policy::{Action, KindPolicy, Kinds};
use tidings_log::store::{FjallStore, KvStore};
use tidings_log::{
    Append, Body, By, ClientMsgId, ConvId, CreateConversation, Log, LogConfig, LogError, TenantId,
    UserId,
};
use tidings_schemas::v1::{MessageRecalled, ReactionAdded};

fn t() -> TenantId {
    TenantId::new("acme").expect("tenant")
}
fn c(s: &str) -> ConvId {
    ConvId::new(s).expect("conv")
}
fn u(s: &str) -> UserId {
    UserId::new(s).expect("user")
}

async fn open(kinds: Kinds) -> (Log, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let store: Arc<dyn KvStore> = Arc::new(FjallStore::open(dir.path()).expect("store"));
    let cfg = LogConfig {
        kinds,
        ..LogConfig::default()
    };
    let log = Log::open(store, MasterKey::generate(), cfg)
        .await
        .expect("open");
    (log, dir)
}

async fn create(log: &Log, conv: &str, kind: &str, creator: &str) {
    log.create_conversation(CreateConversation {
        tenant: t(),
        conv: c(conv),
        kind: kind.into(),
        title: conv.into(),
        creator: u(creator),
        members: Vec::new(),
    })
    .await
    .expect("create");
}

fn post(conv: &str, by: &str, id: &str) -> Append {
    Append::text(
        t(),
        c(conv),
        u(by),
        ClientMsgId::new(id).expect("id"),
        format!("{by} says {id}"),
    )
}

fn body(conv: &str, by: &str, id: &str, body: Body) -> Append {
    Append {
        body,
        ..post(conv, by, id)
    }
}

async fn head(log: &Log, conv: &str) -> u64 {
    log.conversation(&t(), &c(conv))
        .await
        .expect("info")
        .head_seq
}

/// Does `action` as `actor` (holding `role`) in a fresh conversation of `kind` where every
/// role has a member, and says whether it was allowed. A refusal must be `not_allowed` and
/// write nothing.
async fn attempt(log: &Log, kind: &KindPolicy, n: usize, role: &str, action: Action) -> bool {
    let conv = format!("{}-{n}", kind.name);
    let creator = "creator";
    create(log, &conv, &kind.name, creator).await;
    // One member per role (the creator holds the creator role), and a bystander.
    let actor = if role == kind.creator_role {
        creator.to_string()
    } else {
        let actor = format!("as-{role}");
        log.add_member_as(&t(), &c(&conv), &u(creator), &u(&actor), Some(role))
            .await
            .expect("add the actor");
        actor
    };
    log.add_member(&t(), &c(&conv), &u(creator), &u("bystander"))
        .await
        .expect("add a bystander");
    let by = u(&actor);
    let creators_post = log
        .append(post(&conv, creator, "creators"))
        .await
        .expect("the creator posts")
        .seq;
    // The actor's own message, where it may post (recalling one's own needs one).
    let own = if kind.allows(Action::Post, role) {
        Some(
            log.append(post(&conv, &actor, "own"))
                .await
                .expect("post")
                .seq,
        )
    } else {
        None
    };
    let before = head(log, &conv).await;
    let (tc, cc) = (t(), c(&conv));
    let result = match action {
        Action::Post => log.append(post(&conv, &actor, "try")).await,
        Action::React => {
            let r = ReactionAdded {
                target_seq: creators_post,
                reaction: "+1".into(),
            };
            log.append(body(&conv, &actor, "try", Body::ReactionAdded(r)))
                .await
        }
        Action::RecallOwn => {
            let Some(own) = own else {
                return false; // nothing of its own to recall
            };
            let r = MessageRecalled { target_seq: own };
            log.append(body(&conv, &actor, "try", Body::MessageRecalled(r)))
                .await
        }
        Action::RecallOthers => {
            let r = MessageRecalled {
                target_seq: creators_post,
            };
            log.append(body(&conv, &actor, "try", Body::MessageRecalled(r)))
                .await
        }
        Action::Add => log.add_member(&tc, &cc, &by, &u("newcomer")).await,
        Action::Remove => log.remove_member(&tc, &cc, &by, &u("bystander")).await,
        Action::Rename => log.rename(&tc, &cc, &by, "new title").await,
        Action::SetRoles => {
            let other = kind
                .roles
                .iter()
                .find(|r| **r != kind.member_role)
                .unwrap_or(&kind.member_role);
            log.set_role(&tc, &cc, &by, &u("bystander"), other).await
        }
        Action::SetOwnName => {
            log.set_display_name(&tc, &cc, By::Member(by.clone()), &by, "me")
                .await
        }
        Action::SetNames => {
            log.set_display_name(&tc, &cc, By::Member(by.clone()), &u("bystander"), "them")
                .await
        }
        Action::MentionAll => unreachable!("not tried here"),
    };
    match result {
        Ok(done) => {
            assert!(!done.duplicate);
            assert_eq!(head(log, &conv).await, before + 1, "one event written");
            true
        }
        Err(LogError::NotAllowed(why)) => {
            assert!(why.contains(role), "the refusal names the role: {why}");
            assert_eq!(head(log, &conv).await, before, "a refusal writes nothing");
            false
        }
        Err(other) => panic!("{} {role} {action:?}: {other:?}", kind.name),
    }
}

/// Every action of every role of the built-in kinds with members that change, against the
/// policy table: the sequencer enforces exactly what the kind says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_of_every_built_in_kind_is_enforced_as_its_policy_says() {
    let kinds = Kinds::default();
    let (log, _dir) = open(kinds.clone()).await;
    let mut n = 0;
    let mut outcomes = HashMap::new();
    for name in ["group", "announcement", "class"] {
        let kind = kinds.get(name).expect("kind").clone();
        for role in &kind.roles {
            for action in Action::ALL {
                if action == Action::MentionAll {
                    continue;
                }
                n += 1;
                let allowed = attempt(&log, &kind, n, role, action).await;
                let expected = kind.allows(action, role)
                    && (action != Action::RecallOwn || kind.allows(Action::Post, role));
                assert_eq!(allowed, expected, "{name}: {role} {}", action.name());
                outcomes.insert((name, role.clone(), action), allowed);
            }
        }
    }
    // The rules the issue names, spelled out rather than read from the table.
    let is = |kind: &'static str, role: &str, action| outcomes[&(kind, role.to_string(), action)];
    assert!(!is("group", "member", Action::Rename), "the rename bug");
    assert!(is("group", "admin", Action::Rename));
    assert!(is("group", "owner", Action::SetRoles));
    assert!(!is("group", "admin", Action::SetRoles));
    assert!(!is("announcement", "member", Action::Post));
    assert!(is("announcement", "member", Action::React));
    assert!(is("announcement", "admin", Action::Post));
    assert!(!is("class", "parent", Action::SetOwnName));
    assert!(!is("class", "student", Action::SetOwnName));
    assert!(is("class", "teacher", Action::SetNames));
    assert!(is("class", "parent", Action::Post));
    assert!(!is("class", "parent", Action::Add));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_class_the_system_and_teachers_name_parents_and_members_see_the_names() {
    let (log, _dir) = open(Kinds::default()).await;
    create(&log, "class-1a", "class", "ms-li").await;
    let (tc, cc) = (t(), c("class-1a"));
    log.add_member_as(&tc, &cc, &u("ms-li"), &u("xiaoming-dad"), Some("parent"))
        .await
        .expect("add a parent");
    let dad = u("xiaoming-dad");
    let refused = log
        .set_display_name(&tc, &cc, By::Member(dad.clone()), &dad, "Cool Dad")
        .await
        .expect_err("a parent cannot name themselves");
    assert!(matches!(refused, LogError::NotAllowed(_)), "{refused:?}");
    log.set_display_name(&tc, &cc, By::System, &dad, "Xiaoming's dad")
        .await
        .expect("the system names the parent");
    let members = log.members(&tc, &cc, None, 10).await.expect("members");
    let dad_entry = members.iter().find(|m| m.user == dad).expect("dad");
    assert_eq!(
        (
            dad_entry.role_name.as_str(),
            dad_entry.display_name.as_str()
        ),
        ("parent", "Xiaoming's dad")
    );
    log.set_display_name(&tc, &cc, By::Member(u("ms-li")), &dad, "Xiaoming's father")
        .await
        .expect("a teacher renames him");
    // The events say who did it: the system, then the teacher.
    let events = log
        .read(&tc, &cc, tidings_log::ReadRange::forward(1, 10))
        .await
        .expect("read");
    let names: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| match &e.body {
            Some(Body::DisplayNameSet(d)) => Some((e.sender.clone(), d.display_name.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        names,
        vec![
            ("system".into(), "Xiaoming's dad".into()),
            ("ms-li".into(), "Xiaoming's father".into())
        ]
    );
    // A role the kind does not have, and a name too long, are typed refusals.
    let bad_role = log
        .add_member_as(&tc, &cc, &u("ms-li"), &u("x"), Some("owner"))
        .await
        .expect_err("no owners in a class");
    assert!(
        matches!(bad_role, LogError::InvalidRequest(_)),
        "{bad_role:?}"
    );
    let long = "n".repeat(200);
    let too_long = log
        .set_display_name(&tc, &cc, By::System, &dad, &long)
        .await
        .expect_err("too long");
    assert!(
        matches!(too_long, LogError::InvalidRequest(_)),
        "{too_long:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_defined_by_configuration_alone_is_enforced_and_unknown_kinds_are_refused() {
    let mut allow = HashMap::new();
    allow.insert(
        Action::Post,
        vec!["captain".to_string(), "crew".to_string()],
    );
    allow.insert(Action::Add, vec!["captain".to_string()]);
    allow.insert(Action::Rename, vec!["captain".to_string()]);
    let ship = KindPolicy {
        name: "ship".into(),
        roles: vec!["captain".into(), "crew".into(), "passenger".into()],
        creator_role: "captain".into(),
        member_role: "passenger".into(),
        fixed_members: false,
        allow,
        recall_window_ms: 0,
    };
    let (log, _dir) = open(Kinds::new(vec![ship]).expect("kinds")).await;
    create(&log, "boat", "ship", "ahab").await;
    let (tc, cc) = (t(), c("boat"));
    log.add_member(&tc, &cc, &u("ahab"), &u("ishmael"))
        .await
        .expect("add");
    let refused = log
        .append(post("boat", "ishmael", "hello"))
        .await
        .expect_err("a passenger does not post");
    assert!(matches!(refused, LogError::NotAllowed(_)), "{refused:?}");
    let info = log.conversation(&tc, &cc).await.expect("info");
    assert_eq!(info.kind_name, "ship");
    let unknown = log
        .create_conversation(CreateConversation {
            tenant: t(),
            conv: c("other"),
            kind: "castle".into(),
            title: String::new(),
            creator: u("ahab"),
            members: Vec::new(),
        })
        .await
        .expect_err("no such kind");
    assert!(
        matches!(unknown, LogError::InvalidRequest(_)),
        "{unknown:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_conversations_keep_their_two_members_and_a_recall_window_holds() {
    let mut quick = Kinds::default().get("group").expect("group").clone();
    quick.name = "quick".into();
    quick.recall_window_ms = 1;
    let (log, _dir) = open(Kinds::new(vec![quick]).expect("kinds")).await;
    log.create_conversation(CreateConversation {
        tenant: t(),
        conv: c("dm"),
        kind: "direct".into(),
        title: String::new(),
        creator: u("a"),
        members: vec![u("b")],
    })
    .await
    .expect("direct");
    let fixed = log
        .add_member(&t(), &c("dm"), &u("a"), &u("c"))
        .await
        .expect_err("fixed");
    assert!(matches!(fixed, LogError::NotAllowed(_)), "{fixed:?}");

    create(&log, "q", "quick", "a").await;
    let seq = log.append(post("q", "a", "m")).await.expect("post").seq;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let late = log
        .append(body(
            "q",
            "a",
            "r",
            Body::MessageRecalled(MessageRecalled { target_seq: seq }),
        ))
        .await
        .expect_err("past the window");
    assert!(matches!(late, LogError::NotAllowed(_)), "{late:?}");
}
