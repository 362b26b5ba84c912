//! CSV and Parquet downloads: `GET /v1/compliance/export?format=csv|parquet&..`.
//!
//! A JSON-lines export streams as the search runs and ends with a line saying whether it is
//! complete. CSV and Parquet have no such line (and a Parquet file is readable only once its
//! footer is written), so these are written whole first, exactly as `tidings compliance
//! export` writes a file ([`export::create`]: a temporary file, fsync'd and linked into place
//! only when the search completes), into the listener's spool directory. Then:
//!
//! - the search failed: the answer is the error with its status (nothing was sent, nothing is
//!   left in the spool), and the audit log says `failed`;
//! - it completed: the file is opened, unlinked at once (it lives on only as the open file,
//!   so neither a client that goes away nor a crash leaves it behind), and sent with its
//!   `Content-Length`, so a download cut short is visibly short to the client. The audit log
//!   says `completed` once the file is whole on the server.
//!
//! Limits: one download is one of the [`MAX_REQUESTS`] compliance requests at a time (held
//! until the last byte is sent); the spool holds at most that many files, each as large as
//! the export (on the data directory's disk); memory per download is one
//! [`CHUNK_BYTES`] read plus [`CHUNKS_QUEUED`] chunks waiting for the client.

use std::path::Path;

use tidings_archive::compliance::export::{self, Format};
use tokio::io::AsyncReadExt;

use super::*;

/// A downloaded file is read and sent this much at a time...
const CHUNK_BYTES: usize = 64 << 10;
/// ...with at most this many chunks waiting for a slow client.
const CHUNKS_QUEUED: usize = 4;

/// Makes the spool directory, and empties it of what a process killed mid-download left.
pub(super) fn clear_spool(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// The `format` parameter: JSON lines when absent.
pub(super) fn format(params: &Params) -> Result<Format, String> {
    match params.get("format") {
        None => Ok(Format::Jsonl),
        Some(name) => name.parse().map_err(|e: ComplianceError| match e {
            ComplianceError::Invalid(reason) => reason,
            e => e.to_string(),
        }),
    }
}

/// The MIME type a download of `format` is sent as.
pub(super) fn content_type(format: Format) -> &'static str {
    match format {
        Format::Jsonl => "application/x-ndjson",
        Format::Csv => "text/csv; charset=utf-8",
        Format::Parquet => "application/vnd.apache.parquet",
    }
}

/// Runs the export into the spool, then answers with the file or the failure.
pub(super) async fn whole(
    state: &Arc<Plane>,
    query: Query,
    actor: Actor,
    format: Format,
) -> Response<Body> {
    let Ok(permit) = state.requests.clone().try_acquire_owned() else {
        return busy();
    };
    let path = state
        .spool
        .join(format!("{}.{}", uuid::Uuid::now_v7(), format.as_str()));
    let plane = state.clone();
    let tenant = query.tenant.clone();
    // Its own task: a client that leaves mid-search does not cut the search short of
    // recording its outcome.
    let written = tokio::spawn(async move {
        let action = Action::Export {
            destination: format!("http download ({format})"),
        };
        let result = write(&plane, &query, &actor, &action, &path, format).await;
        // Whatever happened, nothing stays under the spool's name.
        let _ = tokio::fs::remove_file(&path).await;
        result
    });
    let (rows, file, len) = match written.await {
        Ok(Ok(done)) => done,
        Ok(Err(ComplianceError::Export { reason, .. })) => {
            // Its path is the spool's, the server's business and not the officer's.
            crate::metrics::COMPLIANCE_QUERIES.inc("failed");
            error!(reason, "a compliance download could not be written");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "export_failed",
                "the server could not write the download; the audit log has its outcome",
            );
        }
        Ok(Err(e)) => {
            crate::metrics::COMPLIANCE_QUERIES.inc("failed");
            return failure(&e);
        }
        Err(e) => {
            crate::metrics::COMPLIANCE_QUERIES.inc("failed");
            error!(error = %e, "a compliance download task ended abnormally");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the export failed; the audit log has its outcome",
            );
        }
    };
    crate::metrics::COMPLIANCE_QUERIES.inc("complete");
    let (tx, rx) = mpsc::channel(CHUNKS_QUEUED);
    tokio::spawn(send(file, tx, permit));
    let mut response = response(StatusCode::OK, content_type(format), Body::Lines(rx));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert("x-tidings-rows", HeaderValue::from(rows));
    let tenant = tenant.as_ref().map_or("tenant", TenantId::as_str);
    let disposition = format!("attachment; filename=\"tidings-{tenant}.{format}\"");
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    response
}

/// The export, written whole at `path` and then opened and unlinked: its rows, the open file
/// and its length.
async fn write(
    plane: &Plane,
    query: &Query,
    actor: &Actor,
    action: &Action,
    path: &Path,
    format: Format,
) -> Result<(u64, tokio::fs::File, u64), ComplianceError> {
    let mut sink = match export::create(path, format) {
        Ok(sink) => sink,
        Err(e) => {
            // A download that cannot start is still an attempt to export: record it. The
            // spool's path is the server's business, not the officer's.
            let reason = "the server could not prepare the download";
            if let Some(tenant) = &query.tenant {
                plane
                    .compliance
                    .deny(tenant, actor, "export", query.to_json().to_string(), reason)
                    .await?;
            }
            return Err(e);
        }
    };
    let progress = Progress::default();
    let rows = plane
        .compliance
        .search(query, actor, action, &progress, &mut sink)
        .await?;
    let spooled = |e: std::io::Error| ComplianceError::Export {
        path: path.display().to_string(),
        reason: format!("cannot read back the finished file: {e}"),
    };
    let file = tokio::fs::File::open(path).await.map_err(spooled)?;
    tokio::fs::remove_file(path).await.map_err(spooled)?;
    let len = file.metadata().await.map_err(spooled)?.len();
    Ok((rows, file, len))
}

/// Sends the file a chunk at a time while the client takes it; a client that leaves or
/// stalls for [`SEND_TIMEOUT`] ends it (the file, already unlinked, goes with it).
async fn send(
    mut file: tokio::fs::File,
    tx: mpsc::Sender<Bytes>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    loop {
        let mut chunk = vec![0; CHUNK_BYTES];
        let n = match file.read(&mut chunk).await {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                // The client sees a body shorter than its Content-Length.
                warn!(error = %e, "reading a compliance download failed");
                return;
            }
        };
        chunk.truncate(n);
        match tokio::time::timeout(SEND_TIMEOUT, tx.send(Bytes::from(chunk))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}
