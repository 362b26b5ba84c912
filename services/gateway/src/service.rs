//! `LogService`: what a gateway needs from the log, whether in this process or across NATS.
//!
//! Every call names its [`Caller`]: the user it acts for (with the token the gateway
//! verified, which a remote log verifies again: docs/decisions/rpc-identity.md), or the
//! gateway itself, for read-only calls of its own (gap-fill reads, heads).

use std::sync::Arc;

use async_trait::async_trait;
use tidings_auth::Claims;
use tidings_log::crypto::TransportKey;
use tidings_log::{
    Append, By, Committed, ConvId, ConversationInfo, ConversationSummary, CreateConversation,
    Event, Log, LogError, MemberPage, MembersQuery, ReadRange, TenantId, UserId,
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
    /// ([`Log::member_page`]).
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
    /// One page of `user`'s search of their own conversations ([`Log::search`]).
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

/// In-process: the gateway calls the log directly (`tidings serve`).
/// The caller is not checked again: the gateway verified the token, and this log is in its
/// own process.
#[async_trait]
impl LogService for Log {
    /// A user's send: held to the writer's admission control (`Log::append_for_user`).
    async fn append(&self, _caller: &Caller, req: Append) -> Result<Committed, LogError> {
        Log::append_for_user(self, req).await
    }
    async fn read(
        &self,
        _caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        range: ReadRange,
    ) -> Result<Vec<Event>, LogError> {
        Log::read(self, t, c, range).await
    }
    async fn create_conversation(
        &self,
        _caller: &Caller,
        req: CreateConversation,
    ) -> Result<Committed, LogError> {
        // Gateways create for users: held to the user caps.
        Log::create_conversation_for_user(self, req).await
    }
    async fn add_member(
        &self,
        _caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
        role: Option<&str>,
    ) -> Result<Committed, LogError> {
        Log::add_member_as(self, t, c, by, user, role).await
    }
    async fn set_role(
        &self,
        _caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
        role: &str,
    ) -> Result<Committed, LogError> {
        Log::set_role(self, t, c, by, user, role).await
    }
    async fn set_display_name(
        &self,
        _caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
        name: &str,
    ) -> Result<Committed, LogError> {
        Log::set_display_name(self, t, c, By::Member(by.clone()), user, name).await
    }
    async fn remove_member(
        &self,
        _caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
    ) -> Result<Committed, LogError> {
        Log::remove_member(self, t, c, by, user).await
    }
    async fn mark_read(
        &self,
        _caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        user: &UserId,
        seq: u64,
    ) -> Result<u64, LogError> {
        Log::mark_read(self, t, c, user, seq).await
    }
    async fn conversations(
        &self,
        _caller: &Caller,
        t: &TenantId,
        user: &UserId,
        after: Option<&ConvId>,
        limit: usize,
    ) -> Result<Vec<ConversationSummary>, LogError> {
        // Every session lists its conversations at Hello: a tenant of another cell is sent
        // there (cells).
        self.serves(t)?;
        Log::conversations(self, t, user, after, limit).await
    }
    async fn members(
        &self,
        _caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        q: &MembersQuery,
    ) -> Result<MemberPage, LogError> {
        Log::member_page(self, t, c, q).await
    }
    async fn is_member(
        &self,
        _caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        user: &UserId,
    ) -> Result<bool, LogError> {
        Log::is_member(self, t, c, user).await
    }
    async fn conversation(
        &self,
        _caller: &Caller,
        t: &TenantId,
        c: &ConvId,
    ) -> Result<ConversationInfo, LogError> {
        Log::conversation(self, t, c).await
    }
    async fn search(
        &self,
        _caller: &Caller,
        t: &TenantId,
        user: &UserId,
        req: &SearchRequest,
    ) -> Result<SearchResult, LogError> {
        Log::search(self, t, user, &req.query, &req.cursor, req.limit as usize).await
    }
    async fn transport_key(
        &self,
        t: &TenantId,
        key_id: Option<u32>,
    ) -> Result<TransportKey, LogError> {
        Log::transport_key(self, t, key_id).await
    }
}
