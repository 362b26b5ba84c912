//! `LogService`: what a gateway needs from the log, whether in this process or across NATS.

use async_trait::async_trait;
use tidings_log::{
    Append, Committed, ConvId, ConversationInfo, ConversationSummary, CreateConversation, Event,
    Log, LogError, Member, ReadRange, TenantId, UserId,
};

#[async_trait]
pub trait LogService: Send + Sync + 'static {
    async fn append(&self, req: Append) -> Result<Committed, LogError>;
    async fn read(
        &self,
        t: &TenantId,
        c: &ConvId,
        range: ReadRange,
    ) -> Result<Vec<Event>, LogError>;
    async fn create_conversation(&self, req: CreateConversation) -> Result<Committed, LogError>;
    async fn add_member(
        &self,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
    ) -> Result<Committed, LogError>;
    async fn remove_member(
        &self,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
    ) -> Result<Committed, LogError>;
    async fn mark_read(
        &self,
        t: &TenantId,
        c: &ConvId,
        user: &UserId,
        seq: u64,
    ) -> Result<u64, LogError>;
    async fn conversations(
        &self,
        t: &TenantId,
        user: &UserId,
        after: Option<&ConvId>,
        limit: usize,
    ) -> Result<Vec<ConversationSummary>, LogError>;
    async fn members(
        &self,
        t: &TenantId,
        c: &ConvId,
        after: Option<&UserId>,
        limit: usize,
    ) -> Result<Vec<Member>, LogError>;
    async fn is_member(&self, t: &TenantId, c: &ConvId, user: &UserId) -> Result<bool, LogError>;
    async fn conversation(&self, t: &TenantId, c: &ConvId) -> Result<ConversationInfo, LogError>;
}

/// In-process: the gateway calls the log directly (`tidings serve`).
#[async_trait]
impl LogService for Log {
    async fn append(&self, req: Append) -> Result<Committed, LogError> {
        Log::append(self, req).await
    }
    async fn read(
        &self,
        t: &TenantId,
        c: &ConvId,
        range: ReadRange,
    ) -> Result<Vec<Event>, LogError> {
        Log::read(self, t, c, range).await
    }
    async fn create_conversation(&self, req: CreateConversation) -> Result<Committed, LogError> {
        // Gateways create for users: held to the user caps.
        Log::create_conversation_for_user(self, req).await
    }
    async fn add_member(
        &self,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
    ) -> Result<Committed, LogError> {
        Log::add_member(self, t, c, by, user).await
    }
    async fn remove_member(
        &self,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
    ) -> Result<Committed, LogError> {
        Log::remove_member(self, t, c, by, user).await
    }
    async fn mark_read(
        &self,
        t: &TenantId,
        c: &ConvId,
        user: &UserId,
        seq: u64,
    ) -> Result<u64, LogError> {
        Log::mark_read(self, t, c, user, seq).await
    }
    async fn conversations(
        &self,
        t: &TenantId,
        user: &UserId,
        after: Option<&ConvId>,
        limit: usize,
    ) -> Result<Vec<ConversationSummary>, LogError> {
        Log::conversations(self, t, user, after, limit).await
    }
    async fn members(
        &self,
        t: &TenantId,
        c: &ConvId,
        after: Option<&UserId>,
        limit: usize,
    ) -> Result<Vec<Member>, LogError> {
        Log::members(self, t, c, after, limit).await
    }
    async fn is_member(&self, t: &TenantId, c: &ConvId, user: &UserId) -> Result<bool, LogError> {
        Log::is_member(self, t, c, user).await
    }
    async fn conversation(&self, t: &TenantId, c: &ConvId) -> Result<ConversationInfo, LogError> {
        Log::conversation(self, t, c).await
    }
}
