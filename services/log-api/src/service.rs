//! `LogService`: what a gateway needs from the log, whether in this process or across NATS.
//!
//! Every call names its [`Caller`]: the user it acts for (with the token the gateway
//! verified, which a remote log verifies again: docs/decisions/rpc-identity.md), or the
//! gateway itself, for read-only calls of its own (gap-fill reads, heads).

use std::sync::Arc;

use async_trait::async_trait;
use tidings_auth::Claims;
use tidings_schemas::v1::Event;

use crate::crypto::TransportKey;
use crate::{
    Committed, ConvId, ConversationInfo, ConversationSummary, CreateConversation, LogError,
    MemberPage, MembersQuery, ReadRange, TenantId, TokenRef, UserId, types::Append,
};
use tidings_schemas::client::{Search as SearchRequest, SearchResult};

/// Who a log call is made for.
#[derive(Clone)]
pub enum Caller {
    /// The gateway itself: only read-only calls are allowed without a user.
    Gateway,
    /// A user, by the token they presented (already verified by the gateway).
    User(Arc<UserCaller>),
}

/// A user's verified token and what it says.
pub struct UserCaller {
    pub claims: Claims,
    pub token: String,
}

impl Caller {
    pub fn user(claims: Claims, token: String) -> Caller {
        Caller::User(Arc::new(UserCaller { claims, token }))
    }

    /// The raw token to send along, empty for the gateway's own calls.
    pub fn token(&self) -> &str {
        match self {
            Caller::Gateway => "",
            Caller::User(u) => &u.token,
        }
    }
}

/// Shows who, never the token.
impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Gateway => f.write_str("Caller::Gateway"),
            Caller::User(u) => f
                .debug_struct("Caller::User")
                .field("tenant", &u.claims.tenant)
                .field("user", &u.claims.user)
                .finish_non_exhaustive(),
        }
    }
}

#[async_trait]
pub trait LogService: Send + Sync + 'static {
    async fn append(&self, caller: &Caller, req: Append) -> Result<Committed, LogError>;
    async fn read(
        &self,
        caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        range: ReadRange,
    ) -> Result<Vec<Event>, LogError>;
    async fn create_conversation(
        &self,
        caller: &Caller,
        req: CreateConversation,
    ) -> Result<Committed, LogError>;
    /// Adds `user` with `role` (`None`: the kind's member role).
    async fn add_member(
        &self,
        caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
        role: Option<&str>,
    ) -> Result<Committed, LogError>;
    async fn set_role(
        &self,
        caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
        role: &str,
    ) -> Result<Committed, LogError>;
    async fn set_display_name(
        &self,
        caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
        name: &str,
    ) -> Result<Committed, LogError>;
    async fn remove_member(
        &self,
        caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
    ) -> Result<Committed, LogError>;
    async fn mark_read(
        &self,
        caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        user: &UserId,
        seq: u64,
    ) -> Result<u64, LogError>;
    async fn conversations(
        &self,
        caller: &Caller,
        t: &TenantId,
        user: &UserId,
        after: Option<&ConvId>,
        limit: usize,
    ) -> Result<Vec<ConversationSummary>, LogError>;
    /// A page of members or of membership changes, with the list's version
    /// (`tidings_log::Log::member_page`).
    async fn members(
        &self,
        caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        q: &MembersQuery,
    ) -> Result<MemberPage, LogError>;
    async fn is_member(
        &self,
        caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        user: &UserId,
    ) -> Result<bool, LogError>;
    async fn conversation(
        &self,
        caller: &Caller,
        t: &TenantId,
        c: &ConvId,
    ) -> Result<ConversationInfo, LogError>;
    /// One page of `user`'s search of their own conversations (`tidings_log::Log::search`).
    async fn search(
        &self,
        caller: &Caller,
        t: &TenantId,
        user: &UserId,
        req: &SearchRequest,
    ) -> Result<SearchResult, LogError>;
    /// The tenant's transport key `key_id` (or its current one): what seals the tenant's
    /// traffic on NATS. Always the gateway's own call.
    async fn transport_key(
        &self,
        t: &TenantId,
        key_id: Option<u32>,
    ) -> Result<TransportKey, LogError>;
}

/// Where the revocation records are (the log, in this process or not).
#[async_trait]
pub trait RevocationStore: Send + Sync {
    async fn is_revoked(&self, token: TokenRef<'_>) -> Result<bool, LogError>;
}
