//! The log in this process as a [`LogService`] (`tidings serve`): the gateway calls it
//! directly. The caller is not checked again: the gateway verified the token, and this log
//! is in its own process.

use async_trait::async_trait;
use tidings_log_api::crypto::TransportKey;
use tidings_log_api::service::{Caller, LogService, RevocationStore};
use tidings_log_api::{
    Append, By, Committed, ConvId, ConversationInfo, ConversationSummary, CreateConversation,
    Event, LogError, MemberPage, MembersQuery, ReadRange, TenantId, TokenRef, UserId,
};
use tidings_schemas::client::{Search as SearchRequest, SearchResult};

use crate::Log;

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

#[async_trait]
impl RevocationStore for Log {
    async fn is_revoked(&self, token: TokenRef<'_>) -> Result<bool, LogError> {
        Log::is_revoked(self, token).await
    }
}
