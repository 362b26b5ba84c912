//! Conversation kinds and their role policies, as data
//! ([docs/decisions/kinds-and-roles.md](../../../docs/decisions/kinds-and-roles.md)).
//!
//! A kind names its roles and, for each thing a member may do, which roles may do it. The
//! sequencer asks [`KindPolicy::check`] before every write and refuses with
//! [`LogError::NotAllowed`], saying which roles may; it has no rule of its own per kind. Four
//! kinds are built in (direct, group, announcement, class); more can be defined in the log's
//! configuration (`[[log.kinds]]`) without code.

use std::collections::HashMap;

use tidings_schemas::storage::{Head, Membership};
use tidings_schemas::v1::{ConversationKind, MemberRole};

use crate::error::LogError;

/// Something a member does that a kind's policy allows to some roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Post messages (and edit one's own).
    Post,
    /// Add and remove reactions.
    React,
    /// Recall one's own messages (within the kind's window).
    RecallOwn,
    /// Recall other members' messages.
    RecallOthers,
    /// Add members.
    Add,
    /// Remove other members (leaving is always allowed).
    Remove,
    /// Rename the conversation.
    Rename,
    /// Change members' roles (and add members with a role other than the default).
    SetRoles,
    /// Set one's own display name.
    SetOwnName,
    /// Set other members' display names.
    SetNames,
    /// Mention everyone (`@all`).
    MentionAll,
}

impl Action {
    pub const ALL: [Action; 11] = [
        Action::Post,
        Action::React,
        Action::RecallOwn,
        Action::RecallOthers,
        Action::Add,
        Action::Remove,
        Action::Rename,
        Action::SetRoles,
        Action::SetOwnName,
        Action::SetNames,
        Action::MentionAll,
    ];

    /// The action of that configuration name.
    pub fn from_name(name: &str) -> Result<Action, String> {
        Action::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Action::ALL.iter().map(|a| a.name()).collect();
                format!("no action {name:?} (actions: {})", names.join(", "))
            })
    }

    /// The name used in configuration and in refusals.
    pub fn name(self) -> &'static str {
        match self {
            Action::Post => "post",
            Action::React => "react",
            Action::RecallOwn => "recall_own",
            Action::RecallOthers => "recall_others",
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Rename => "rename",
            Action::SetRoles => "set_roles",
            Action::SetOwnName => "set_own_name",
            Action::SetNames => "set_names",
            Action::MentionAll => "mention_all",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Action::Post => "post",
            Action::React => "react",
            Action::RecallOwn => "recall their own messages",
            Action::RecallOthers => "recall other members' messages",
            Action::Add => "add members",
            Action::Remove => "remove other members",
            Action::Rename => "rename the conversation",
            Action::SetRoles => "change members' roles",
            Action::SetOwnName => "set their own display name",
            Action::SetNames => "set other members' display names",
            Action::MentionAll => "mention everyone",
        }
    }
}

/// One kind: its roles and who may do what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KindPolicy {
    /// `[a-z0-9_-]{1,32}`.
    pub name: String,
    /// Every role of the kind.
    pub roles: Vec<String>,
    /// The role of whoever creates a conversation of this kind.
    pub creator_role: String,
    /// The role of every other member, at creation or when added without a role.
    pub member_role: String,
    /// Members fixed at creation (a direct conversation's two): no adds, removes or leaves.
    pub fixed_members: bool,
    /// For each action, the roles that may do it (an action not listed: no role may).
    pub allow: HashMap<Action, Vec<String>>,
    /// How long after posting its author may recall a message, in ms; 0: no limit.
    pub recall_window_ms: u64,
}

impl KindPolicy {
    /// Whether `role` may do `action`.
    pub fn allows(&self, action: Action, role: &str) -> bool {
        self.allow
            .get(&action)
            .is_some_and(|roles| roles.iter().any(|r| r == role))
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// `Ok` if `role` may do `action`; else the refusal, naming who may.
    pub fn check(&self, action: Action, role: &str) -> Result<(), LogError> {
        if self.allows(action, role) {
            return Ok(());
        }
        let who = self.allow.get(&action).map(Vec::as_slice).unwrap_or(&[]);
        let who = if who.is_empty() {
            "no member".to_string()
        } else {
            who.join(", ")
        };
        Err(LogError::NotAllowed(format!(
            "in a {} conversation a {role} may not {} (allowed: {who})",
            self.name,
            action.verb()
        )))
    }

    /// Checks the policy is whole: a valid name, its roles named, every role it refers to
    /// among them.
    pub fn validate(&self) -> Result<(), String> {
        let valid_name = |s: &str| {
            !s.is_empty()
                && s.len() <= 32
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        };
        if !valid_name(&self.name) {
            return Err(format!(
                "kind name {:?}: 1-32 of a-z, 0-9, _ and -",
                self.name
            ));
        }
        if self.roles.is_empty() {
            return Err(format!("kind {}: no roles", self.name));
        }
        for (i, r) in self.roles.iter().enumerate() {
            if !valid_name(r) {
                return Err(format!(
                    "kind {}: role name {r:?}: 1-32 of a-z, 0-9, _ and -",
                    self.name
                ));
            }
            if self.roles[..i].contains(r) {
                return Err(format!("kind {}: role {r} twice", self.name));
            }
        }
        for (what, role) in [
            ("creator_role", &self.creator_role),
            ("member_role", &self.member_role),
        ] {
            if !self.has_role(role) {
                return Err(format!(
                    "kind {}: {what} {role:?} is not one of its roles",
                    self.name
                ));
            }
        }
        for (action, roles) in &self.allow {
            if let Some(r) = roles.iter().find(|r| !self.has_role(r)) {
                return Err(format!(
                    "kind {}: {} names {r:?}, not one of its roles",
                    self.name,
                    action.name()
                ));
            }
        }
        Ok(())
    }
}

fn roles(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn policy(
    name: &str,
    all: &[&str],
    (creator, member): (&str, &str),
    rules: &[(Action, &[&str])],
) -> KindPolicy {
    KindPolicy {
        name: name.into(),
        roles: roles(all),
        creator_role: creator.into(),
        member_role: member.into(),
        fixed_members: false,
        allow: rules.iter().map(|(a, r)| (*a, roles(r))).collect(),
        recall_window_ms: 0,
    }
}

/// The built-in kinds.
pub fn builtin() -> Vec<KindPolicy> {
    use Action::*;
    const GROUP: &[&str] = &["owner", "admin", "member"];
    const LEADS: &[&str] = &["owner", "admin"];
    let mut direct = policy(
        DIRECT,
        &["member"],
        ("member", "member"),
        &[
            (Post, &["member"]),
            (React, &["member"]),
            (RecallOwn, &["member"]),
            (SetOwnName, &["member"]),
            (MentionAll, &["member"]),
        ],
    );
    direct.fixed_members = true;
    let group = policy(
        GROUP_KIND,
        GROUP,
        ("owner", "member"),
        &[
            (Post, GROUP),
            (React, GROUP),
            (RecallOwn, GROUP),
            (RecallOthers, LEADS),
            (Add, LEADS),
            (Remove, LEADS),
            (Rename, LEADS),
            (SetRoles, &["owner"]),
            (SetOwnName, GROUP),
            (SetNames, LEADS),
            (MentionAll, GROUP),
        ],
    );
    // Only owners and admins post; members read and react.
    let announcement = policy(
        "announcement",
        GROUP,
        ("owner", "member"),
        &[
            (Post, LEADS),
            (React, GROUP),
            (RecallOwn, LEADS),
            (RecallOthers, LEADS),
            (Add, LEADS),
            (Remove, LEADS),
            (Rename, LEADS),
            (SetRoles, &["owner"]),
            (SetOwnName, GROUP),
            (SetNames, LEADS),
            (MentionAll, LEADS),
        ],
    );
    // Teachers run the class; display names are set by teachers or the system, read-only
    // to parents and students.
    const CLASS: &[&str] = &["teacher", "parent", "student"];
    let class = policy(
        "class",
        CLASS,
        ("teacher", "student"),
        &[
            (Post, CLASS),
            (React, CLASS),
            (RecallOwn, CLASS),
            (RecallOthers, &["teacher"]),
            (Add, &["teacher"]),
            (Remove, &["teacher"]),
            (Rename, &["teacher"]),
            (SetRoles, &["teacher"]),
            (SetOwnName, &["teacher"]),
            (SetNames, &["teacher"]),
            (MentionAll, &["teacher"]),
        ],
    );
    vec![direct, group, announcement, class]
}

pub const DIRECT: &str = "direct";
pub const GROUP_KIND: &str = "group";

/// A stored conversation's kind by name (heads written before kind names carry the
/// built-in kind only).
pub fn kind_name(head: &Head) -> &str {
    if !head.kind_name.is_empty() {
        &head.kind_name
    } else if head.kind == ConversationKind::Direct as i32 {
        DIRECT
    } else {
        GROUP_KIND
    }
}

/// A stored membership's role by name (memberships written before role names carry the
/// built-in role only).
pub fn role_name(m: &Membership) -> &str {
    if !m.role_name.is_empty() {
        &m.role_name
    } else if m.role == MemberRole::Owner as i32 {
        "owner"
    } else {
        "member"
    }
}

/// The built-in enum for a role name, for readers that predate role names.
pub fn builtin_role(name: &str) -> MemberRole {
    match name {
        "owner" => MemberRole::Owner,
        "member" => MemberRole::Member,
        _ => MemberRole::Unspecified,
    }
}

/// The built-in enum for a kind name, for readers that predate kind names.
pub fn builtin_kind(name: &str) -> ConversationKind {
    match name {
        DIRECT => ConversationKind::Direct,
        GROUP_KIND => ConversationKind::Group,
        _ => ConversationKind::Unspecified,
    }
}

/// The kinds a log knows: the built-in ones and those configured.
#[derive(Clone, Debug)]
pub struct Kinds {
    by_name: HashMap<String, KindPolicy>,
}

impl Default for Kinds {
    fn default() -> Self {
        Kinds::new(Vec::new()).expect("the built-in kinds are valid")
    }
}

impl Kinds {
    /// The built-in kinds plus `extra`, each validated; a name taken twice is refused.
    pub fn new(extra: Vec<KindPolicy>) -> Result<Kinds, String> {
        let mut by_name = HashMap::new();
        for k in builtin().into_iter().chain(extra) {
            k.validate()?;
            if by_name.contains_key(&k.name) {
                return Err(format!("kind {} is defined twice", k.name));
            }
            by_name.insert(k.name.clone(), k);
        }
        Ok(Kinds { by_name })
    }

    /// The kind of that name, or the typed refusal a client sees.
    pub fn get(&self, name: &str) -> Result<&KindPolicy, LogError> {
        self.by_name.get(name).ok_or_else(|| {
            let mut known: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
            known.sort_unstable();
            LogError::InvalidRequest(format!(
                "no conversation kind {name:?} (known: {})",
                known.join(", ")
            ))
        })
    }

    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_kinds_are_valid_and_say_who_may() {
        let kinds = Kinds::default();
        assert_eq!(
            kinds.names(),
            vec!["announcement", "class", "direct", "group"]
        );
        let class = kinds.get("class").expect("class");
        assert!(class.check(Action::SetNames, "teacher").is_ok());
        let refusal = class
            .check(Action::SetOwnName, "parent")
            .expect_err("parent");
        assert_eq!(
            refusal.to_string(),
            LogError::NotAllowed(
                "in a class conversation a parent may not set their own display name \
                 (allowed: teacher)"
                    .into()
            )
            .to_string()
        );
        assert!(kinds.get("nope").is_err());
    }

    #[test]
    fn a_configured_kind_must_be_whole() {
        let mut bad = builtin().remove(1);
        bad.name = "guild".into();
        bad.allow.insert(Action::Post, vec!["captain".into()]);
        assert!(
            Kinds::new(vec![bad.clone()])
                .expect_err("refused")
                .contains("captain")
        );
        bad.allow.remove(&Action::Post);
        bad.creator_role = "captain".into();
        assert!(
            Kinds::new(vec![bad.clone()])
                .expect_err("refused")
                .contains("creator_role")
        );
        bad.creator_role = "owner".into();
        assert!(Kinds::new(vec![bad.clone()]).is_ok());
        bad.name = "group".into();
        assert!(
            Kinds::new(vec![bad.clone()])
                .expect_err("refused")
                .contains("twice")
        );
        bad.name = "Bad Name".into();
        assert!(Kinds::new(vec![bad]).is_err());
    }
}
