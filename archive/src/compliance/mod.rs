//! Compliance: search and export of a tenant's history, the audit log, legal holds and
//! retention.
//!
//! Every read of message content for compliance goes through [`Compliance`], which appends
//! an audit record before it reads anything (no record, no read) and another when it is
//! done, with the row count. The scanning engine itself is private to this module.
//!
//! - [`hit`]: what a search finds (an event with its edits and recall) and its JSON form.
//! - `scan` (private): the engine over the archive (pruned by partitions, row-group
//!   statistics and bloom filters, decrypting only candidate rows) and the hot log.
//! - [`audit`]: the per-tenant, hash-chained, sealed audit log.
//! - [`hold`]: legal holds.
//! - [`export`]: JSONL, CSV and Parquet export files, written whole or not at all.
//! - [`retention`]: the retention pass the archiver runs.

pub mod audit;
pub mod export;
pub mod hit;
pub mod hold;
pub mod retention;
mod scan;
mod service;

pub use hit::{Edit, Fate, Hit, Recall, Tier, event_json, hit_json, parse_time, rfc3339_ms};
pub use hold::{HoldSet, HoldSpec, Scope};
pub use service::{Action, Compliance, Progress, Sink};

use serde_json::{Value, json};
use tidings_log::{ConvId, LogError, TenantId, UserId};

use crate::error::ArchiveError;

/// The longest text filter accepted, in characters.
pub const MAX_TEXT_CHARS: usize = 1024;

/// What a search or export selects. All filters are optional except the tenant; times are
/// milliseconds since the Unix epoch, `from` inclusive and `to` exclusive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    pub tenant: Option<TenantId>,
    pub conv: Option<ConvId>,
    pub sender: Option<UserId>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// Words (case- and width-folded) or CJK characters of a message's text (original or
    /// edited) or a title, as `tidings_log::search::Needle` matches them.
    pub text: Option<String>,
}

impl Query {
    pub fn for_tenant(tenant: TenantId) -> Self {
        Query {
            tenant: Some(tenant),
            ..Query::default()
        }
    }

    /// The tenant, checked present; every other check of [`Query::validate`].
    pub fn validate(&self) -> Result<&TenantId, ComplianceError> {
        let tenant = self
            .tenant
            .as_ref()
            .ok_or_else(|| ComplianceError::invalid("a tenant is required"))?;
        if let (Some(from), Some(to)) = (self.from_ms, self.to_ms)
            && from >= to
        {
            return Err(ComplianceError::invalid(format!(
                "the time range is empty: from ({}) is not before to ({})",
                rfc3339_ms(from),
                rfc3339_ms(to)
            )));
        }
        if let Some(text) = &self.text {
            let chars = text.chars().count();
            if chars == 0 || chars > MAX_TEXT_CHARS {
                return Err(ComplianceError::invalid(format!(
                    "the text filter must be 1 to {MAX_TEXT_CHARS} characters, not {chars}"
                )));
            }
            tidings_log::search::Needle::new(text)
                .map_err(|e| ComplianceError::invalid(format!("the text filter: {e}")))?;
        }
        Ok(tenant)
    }

    /// The filters as recorded in the audit log.
    pub fn to_json(&self) -> Value {
        json!({
            "tenant": self.tenant.as_ref().map(|t| t.as_str()),
            "conversation": self.conv.as_ref().map(|c| c.as_str()),
            "sender": self.sender.as_ref().map(|u| u.as_str()),
            "from": self.from_ms.map(rfc3339_ms),
            "to": self.to_ms.map(rfc3339_ms),
            "text": self.text,
        })
    }
}

/// How a compliance request reached us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `tidings compliance ...` on the machine, with the store's keys.
    Cli,
    /// The admin listener, with a `compliance` token.
    Http,
    /// The archiver's own retention pass.
    Archiver,
    /// Another cell's word, over the cell link (a tenant shredded in its home cell).
    Cell,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Cli => "cli",
            Via::Http => "http",
            Via::Archiver => "archiver",
            Via::Cell => "cell",
        }
    }
}

/// Who is asking: recorded in every audit record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    name: String,
    pub via: Via,
}

impl Actor {
    /// 1–128 characters, no control characters (it is printed in audit listings).
    pub fn new(name: &str, via: Via) -> Result<Self, ComplianceError> {
        let chars = name.chars().count();
        if chars == 0 || chars > 128 || name.chars().any(char::is_control) {
            return Err(ComplianceError::invalid(
                "the actor must be 1 to 128 characters without control characters",
            ));
        }
        Ok(Actor {
            name: name.to_string(),
            via,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ComplianceError {
    /// A malformed filter, time range, actor or hold.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The caller may not do this (recorded in the audit log where it was an access attempt).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A legal hold forbids it; recorded in the audit log.
    #[error("refused: {0}")]
    Held(String),
    /// The export file could not be written; nothing was left at its path.
    #[error("cannot write the export to {path}: {reason}")]
    Export { path: String, reason: String },
    #[error("no such legal hold: {0}")]
    NoSuchHold(String),
    /// Results could not be handed to the caller (stdout closed, an HTTP client gone).
    #[error("results could not be delivered to {to}: {reason}")]
    Delivery { to: String, reason: String },
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Log(#[from] LogError),
}

impl ComplianceError {
    pub fn invalid(reason: impl Into<String>) -> Self {
        ComplianceError::Invalid(reason.into())
    }

    /// Stable snake_case name, printed in JSON error lines and HTTP bodies.
    pub fn code(&self) -> &'static str {
        match self {
            ComplianceError::Invalid(_) => "invalid_request",
            ComplianceError::Forbidden(_) => "forbidden",
            ComplianceError::Held(_) => "held",
            ComplianceError::Export { .. } => "export_failed",
            ComplianceError::NoSuchHold(_) => "no_such_hold",
            ComplianceError::Delivery { .. } => "delivery_failed",
            ComplianceError::Archive(e) => e.code(),
            ComplianceError::Log(e) => e.code(),
        }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            ComplianceError::Archive(e) => e.is_retryable(),
            ComplianceError::Log(e) => e.is_retryable(),
            _ => false,
        }
    }
}
