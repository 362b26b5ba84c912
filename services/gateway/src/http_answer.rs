//! A plain HTTP request's head, as the listener reads it, and the answer a handler gives:
//! what the handlers beside `/v1/ws` (health, the web client, bots) share.

/// The request line and the headers this side looks at.
pub(crate) struct Head {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) query: String,
    /// `Authorization`, if given.
    pub(crate) authorization: Option<String>,
    /// `Content-Length`, if given (and a number).
    pub(crate) content_length: Option<usize>,
}

/// An answer, written whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Extra headers (name, value).
    pub headers: Vec<(&'static str, String)>,
}

impl Answer {
    pub fn ok(content_type: &'static str, body: impl Into<Vec<u8>>) -> Answer {
        Answer {
            status: 200,
            content_type,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    pub fn error(status: u16, message: &str) -> Answer {
        Answer {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{message}\n").into_bytes(),
            headers: Vec::new(),
        }
    }
}
