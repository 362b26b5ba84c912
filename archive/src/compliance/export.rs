//! Export files: JSONL, CSV and Parquet, written whole or not at all.
//!
//! An export is evidence handed to someone else, so two rules shape this module:
//!
//! - **Nothing partial ever looks complete.** [`create`] writes to a hidden temporary file
//!   next to the target (`.<name>.partial-<uuid>`); only [`Sink::finish`] makes it durable and
//!   gives it the target's name, and never over a file that is already there. An export that
//!   fails, is cancelled or is dropped unfinished removes its temporary file. (A process killed
//!   outright cannot clean up: it leaves a `.partial-` file, which says what it is.)
//! - **Faithful data.** Cells hold exactly what the events hold; nothing is escaped away,
//!   trimmed or sanitised beyond what the format's own quoting needs.
//!
//! Memory is bounded: text formats are encoded into a buffer written out every
//! [`TEXT_BUFFER_BYTES`]; Parquet keeps at most one row group ([`ROW_GROUP_ROWS`] rows or about
//! [`ROW_GROUP_BYTES`]) before encoding it. The writes, the Parquet encoding (zstd) and the
//! file's fsync run on tokio's blocking pool with the file and buffer moved there and back, so
//! the runtime's threads do not wait on the disk (this also works on a current-thread runtime,
//! where `block_in_place` would panic). Only the final link, unlink and directory fsync run in
//! place, once per export, so that a cancelled `finish` cannot half-publish (see `publish`).

use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use parquet::basic::{Compression, ZstdLevel};
use parquet::data_type::{ByteArray, ByteArrayType, DataType, Int32Type, Int64Type};
use parquet::errors::ParquetError;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::writer::{SerializedColumnWriter, SerializedFileWriter};
use parquet::schema::parser::parse_message_type;
use parquet::schema::types::ColumnPath;
use tidings_log::Body;

use super::hit::event_text;
use super::{ComplianceError, Hit, Sink, hit_json, rfc3339_ms};

/// Encoded JSONL or CSV is written out once the buffer holds this much.
pub const TEXT_BUFFER_BYTES: usize = 256 << 10;
/// A Parquet row group is written after at most this many rows...
pub const ROW_GROUP_ROWS: usize = 64 << 10;
/// ...or once its strings add up to this many bytes, whichever comes first.
pub const ROW_GROUP_BYTES: usize = 32 << 20;
/// zstd level of the Parquet columns: the library's default, a good size for its speed.
const ZSTD_LEVEL: i32 = 3;

/// An export file's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One [`hit_json`] object per line.
    Jsonl,
    /// RFC 4180 with a header row; see [`CSV_COLUMNS`].
    Csv,
    /// Plaintext Parquet for data tools; see [`PARQUET_SCHEMA`].
    Parquet,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Jsonl, Format::Csv, Format::Parquet];

    /// The name `FromStr` accepts, also the usual file extension.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
            Format::Parquet => "parquet",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Format {
    type Err = ComplianceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                ComplianceError::invalid(format!(
                    "unknown export format {s:?}: the choices are jsonl, csv and parquet"
                ))
            })
    }
}

/// The CSV header, in column order. Every row has exactly these cells:
///
/// - `time` and `recalled_time` are RFC 3339 in UTC with milliseconds ([`rfc3339_ms`]);
/// - `text` is a message's text, an edit's new text or a conversation's title;
/// - `target_seq` is the message an edit, recall or reaction is about;
/// - `edits` is how many times a message was edited (`0` for other kinds), `last_edit_text`
///   the text of the latest edit;
/// - a cell is empty when its value is absent (Parquet's null). CSV cannot tell an empty
///   text from an absent one; the JSONL and Parquet (`details`) exports can.
///
/// Records are UTF-8 without a byte order mark and end in CRLF, as RFC 4180 specifies (and as
/// Excel and Python's `csv` write by default); a cell is quoted when it contains `"`, `,`, CR
/// or LF, with inner quotes doubled. A line break inside a text stays as it was.
///
/// Cells are never altered. In particular a cell starting with `=`, `+`, `-` or `@` is left
/// as it is, although a spreadsheet may take it for a formula: an export is evidence, and a
/// changed cell would no longer say what was said. Spreadsheet users should import the file
/// with every column as text rather than open it directly.
pub const CSV_COLUMNS: [&str; 15] = [
    "tenant",
    "conversation",
    "seq",
    "event_id",
    "sender",
    "time",
    "kind",
    "text",
    "target_seq",
    "edits",
    "last_edit_text",
    "recalled_seq",
    "recalled_time",
    "tier",
    "client_msg_id",
];

/// The Parquet export's schema: the CSV columns with their types (absent values are nulls),
/// plus `details`, the whole [`hit_json`] object as text, so nothing a hit carries is lost
/// (mentions, reply, reaction, member, the edits' and recall's details, `matched`).
pub const PARQUET_SCHEMA: &str = "message tidings_export {
    REQUIRED BYTE_ARRAY tenant (STRING);
    REQUIRED BYTE_ARRAY conversation (STRING);
    REQUIRED INT64 seq;
    REQUIRED BYTE_ARRAY event_id (STRING);
    REQUIRED BYTE_ARRAY sender (STRING);
    REQUIRED INT64 time (TIMESTAMP(MILLIS, true));
    REQUIRED BYTE_ARRAY kind (STRING);
    OPTIONAL BYTE_ARRAY text (STRING);
    OPTIONAL INT64 target_seq;
    REQUIRED INT32 edits;
    OPTIONAL BYTE_ARRAY last_edit_text (STRING);
    OPTIONAL INT64 recalled_seq;
    OPTIONAL INT64 recalled_time (TIMESTAMP(MILLIS, true));
    REQUIRED BYTE_ARRAY tier (STRING);
    REQUIRED BYTE_ARRAY client_msg_id (STRING);
    REQUIRED BYTE_ARRAY details (STRING);
}";

/// How much is held before it is written; [`create`] uses the constants above, tests make
/// them tiny to exercise every flush.
#[derive(Clone, Copy, Debug)]
struct Limits {
    text_buffer_bytes: usize,
    row_group_rows: usize,
    row_group_bytes: usize,
}

const LIMITS: Limits = Limits {
    text_buffer_bytes: TEXT_BUFFER_BYTES,
    row_group_rows: ROW_GROUP_ROWS,
    row_group_bytes: ROW_GROUP_BYTES,
};

/// An export being written: a [`Sink`] whose [`finish`](Sink::finish) puts the file at its
/// path. Dropped unfinished, it removes what it wrote.
pub struct ExportFile {
    /// The target, made absolute at [`create`] so a later change of directory cannot move it.
    path: PathBuf,
    /// The target as the caller named it, for messages.
    shown: String,
    dir: PathBuf,
    /// The temporary file while it exists and is ours to remove.
    temp: Option<PathBuf>,
    format: Format,
    limits: Limits,
    /// `None` once finished, or after a failed write (the export is then dead).
    state: Option<State>,
}

enum State {
    /// JSONL or CSV: encoded records waiting to be written.
    Text { file: File, buf: Vec<u8>, csv: bool },
    /// Boxed: the writer and a row group's sixteen columns are some 400 bytes to move about.
    Parquet(Box<ParquetOut>),
}

/// The Parquet writer and the row group being gathered.
struct ParquetOut {
    writer: SerializedFileWriter<File>,
    group: Columns,
}

/// Starts an export to `path`. Refuses a path where anything already exists (an export
/// never replaces a file), a missing directory, and a directory it cannot create files in;
/// a refusal leaves nothing behind.
pub fn create(path: &Path, format: Format) -> Result<ExportFile, ComplianceError> {
    create_with(path, format, LIMITS)
}

fn create_with(path: &Path, format: Format, limits: Limits) -> Result<ExportFile, ComplianceError> {
    let shown = path.display().to_string();
    let fail = |reason: String| ComplianceError::Export {
        path: shown.clone(),
        reason,
    };
    let absolute =
        std::path::absolute(path).map_err(|e| fail(format!("cannot resolve the path: {e}")))?;
    let (Some(dir), Some(name)) = (absolute.parent(), absolute.file_name()) else {
        return Err(fail("the path does not name a file".into()));
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(fail(format!("{} is not a directory", dir.display()))),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(fail(format!(
                "the directory {} does not exist",
                dir.display()
            )));
        }
        Err(e) => return Err(fail(format!("cannot look at {}: {e}", dir.display()))),
    }
    // `symlink_metadata`: even a dangling symlink at the path is something not to replace.
    match std::fs::symlink_metadata(&absolute) {
        Ok(m) if m.is_dir() => return Err(fail("the path is a directory".into())),
        Ok(_) => {
            return Err(fail(
                "a file already exists there, and an export never replaces one".into(),
            ));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(fail(format!("cannot look at the path: {e}"))),
    }
    let mut temp_name = OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".partial-{}", uuid::Uuid::now_v7()));
    let temp = dir.join(temp_name);
    // `create_new`: never open a file someone else made, even with a name this unlikely.
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .map_err(|e| fail(format!("cannot create a file in {}: {e}", dir.display())))?;
    let mut export = ExportFile {
        dir: dir.to_path_buf(),
        path: absolute.clone(),
        shown: shown.clone(),
        temp: Some(temp),
        format,
        limits,
        state: None,
    };
    // From here on, an error drops `export`, which removes the temporary file.
    export.state = Some(match format {
        Format::Jsonl => State::Text {
            file,
            buf: Vec::new(),
            csv: false,
        },
        Format::Csv => {
            let mut buf = Vec::new();
            csv_record(&mut buf, &CSV_COLUMNS);
            State::Text {
                file,
                buf,
                csv: true,
            }
        }
        Format::Parquet => State::Parquet(Box::new(ParquetOut {
            // Writes only the magic bytes, into the writer's own buffer.
            writer: parquet_writer(file)
                .map_err(|e| fail(format!("cannot start the Parquet file: {e}")))?,
            group: Columns::default(),
        })),
    });
    Ok(export)
}

impl ExportFile {
    /// Where the export will be once finished.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    fn error(&self, reason: impl Into<String>) -> ComplianceError {
        ComplianceError::Export {
            path: self.shown.clone(),
            reason: reason.into(),
        }
    }

    /// Encodes one hit; writes the buffer or row group out when it is full.
    async fn push(&mut self, hit: Hit) -> Result<(), ComplianceError> {
        let limits = self.limits;
        let full = match self.state.as_mut() {
            None => return Err(self.error("the export is finished or an earlier write failed")),
            Some(State::Text { buf, csv, .. }) => {
                if *csv {
                    csv_record(buf, &Row::new(hit).into_csv_cells());
                } else {
                    serde_json::to_writer(&mut *buf, &hit_json(&hit)).map_err(|e| {
                        ComplianceError::Export {
                            path: self.shown.clone(),
                            reason: format!("cannot encode a hit as JSON: {e}"),
                        }
                    })?;
                    buf.push(b'\n');
                }
                buf.len() >= limits.text_buffer_bytes
            }
            Some(State::Parquet(out)) => {
                let group = &mut out.group;
                let details = hit_json(&hit).to_string();
                group
                    .push(Row::new(hit), details)
                    .map_err(|reason| ComplianceError::Export {
                        path: self.shown.clone(),
                        reason,
                    })?;
                group.len() >= limits.row_group_rows || group.bytes >= limits.row_group_bytes
            }
        };
        if full {
            let state = self.take_state()?;
            let state = blocking(move || state.write_out())
                .await
                .map_err(|reason| self.error(reason))?;
            self.state = Some(state);
        }
        Ok(())
    }

    /// Writes what is left, fsyncs the file, then gives it the target's name.
    async fn complete(&mut self) -> Result<(), ComplianceError> {
        let state = self.take_state()?;
        let temp = self
            .temp
            .clone()
            .ok_or_else(|| self.error("the export was discarded"))?;
        let file = blocking(move || state.close())
            .await
            .map_err(|reason| self.error(reason))?;
        drop(file);
        // Deliberately not on the blocking pool: with no await between them, a cancelled
        // `finish` either never linked (and drop removes the temporary file) or returned.
        // These are three metadata operations, once per export.
        publish(&temp, &self.path, &self.dir).map_err(|reason| self.error(reason))?;
        self.temp = None;
        Ok(())
    }

    fn take_state(&mut self) -> Result<State, ComplianceError> {
        self.state
            .take()
            .ok_or_else(|| self.error("the export is finished or an earlier write failed"))
    }

    /// Removes the temporary file; the export cannot be used afterwards.
    fn discard(&mut self) {
        self.state = None;
        if let Some(temp) = self.temp.take() {
            match std::fs::remove_file(&temp) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(
                    path = %temp.display(),
                    error = %e,
                    "failed to remove a partial export file"
                ),
            }
        }
    }
}

#[async_trait::async_trait]
impl Sink for ExportFile {
    async fn hit(&mut self, hit: Hit) -> Result<(), ComplianceError> {
        let result = self.push(hit).await;
        if result.is_err() {
            self.discard();
        }
        result
    }

    /// Makes the export durable and moves it into place; on failure nothing is at the path
    /// and the temporary file is gone.
    async fn finish(&mut self) -> Result<(), ComplianceError> {
        let result = self.complete().await;
        if result.is_err() {
            self.discard();
        }
        result
    }
}

impl Drop for ExportFile {
    fn drop(&mut self) {
        // A task on the blocking pool may still hold the file (a cancelled write); removing
        // the name is enough, its data goes when that task closes it.
        self.discard();
    }
}

/// Gives the finished, fsync'd temporary file the target's name, then fsyncs the directory.
///
/// `hard_link` then `remove_file`, not `rename`: `link(2)` fails if the target exists, in the
/// same step that creates it, whereas `rename(2)` silently replaces it, and checking first
/// leaves a window in which a file that appeared would be overwritten. (Linux's
/// `renameat2(RENAME_NOREPLACE)` does both at once but needs `libc` and unsafe code, which
/// this workspace forbids.) The cost: a file system without hard links cannot take exports,
/// and a crash between the two calls leaves a complete `.partial-` file next to the export.
fn publish(temp: &Path, path: &Path, dir: &Path) -> Result<(), String> {
    std::fs::hard_link(temp, path).map_err(|e| {
        if e.kind() == ErrorKind::AlreadyExists {
            "a file appeared at the path while the export was written; it was left as it is"
                .to_string()
        } else {
            format!("cannot move the finished export into place: {e}")
        }
    })?;
    let settled = std::fs::remove_file(temp)
        .map_err(|e| format!("cannot remove the temporary file: {e}"))
        .and_then(|()| {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("cannot fsync the directory: {e}"))
        });
    if settled.is_err() {
        // The link is ours (it could not have replaced anything); take it back so that a
        // failed export leaves nothing at its path.
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "failed to remove a failed export");
        }
    }
    settled
}

/// Runs blocking file work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(format!("the writing task failed: {e}")))
}

impl State {
    /// Writes the buffered records or the gathered row group. Blocking.
    fn write_out(self) -> Result<State, String> {
        match self {
            State::Text {
                mut file,
                mut buf,
                csv,
            } => {
                file.write_all(&buf)
                    .map_err(|e| format!("cannot write: {e}"))?;
                buf.clear();
                Ok(State::Text { file, buf, csv })
            }
            State::Parquet(mut out) => {
                let group = std::mem::take(&mut out.group);
                if group.len() > 0 {
                    group
                        .write(&mut out.writer)
                        .map_err(|e| format!("cannot write a Parquet row group: {e}"))?;
                }
                Ok(State::Parquet(out))
            }
        }
    }

    /// Writes everything left (and the Parquet footer) and fsyncs the file. Blocking.
    fn close(self) -> Result<File, String> {
        let file = match self.write_out()? {
            State::Text { file, .. } => file,
            State::Parquet(out) => out
                .writer
                .into_inner()
                .map_err(|e| format!("cannot write the Parquet footer: {e}"))?,
        };
        file.sync_all().map_err(|e| format!("cannot fsync: {e}"))?;
        Ok(file)
    }
}

/// One hit in the export's columns (all but `details`).
struct Row {
    tenant: String,
    conversation: String,
    seq: u64,
    event_id: String,
    sender: String,
    time_ms: i64,
    kind: &'static str,
    text: Option<String>,
    target_seq: Option<u64>,
    edits: usize,
    last_edit_text: Option<String>,
    recalled_seq: Option<u64>,
    recalled_time_ms: Option<i64>,
    tier: &'static str,
    client_msg_id: String,
}

impl Row {
    fn new(hit: Hit) -> Row {
        let e = hit.event;
        let text = event_text(&e).map(str::to_string);
        let target_seq = match &e.body {
            Some(Body::MessageEdited(x)) => Some(x.target_seq),
            Some(Body::MessageRecalled(x)) => Some(x.target_seq),
            Some(Body::ReactionAdded(x)) => Some(x.target_seq),
            Some(Body::ReactionRemoved(x)) => Some(x.target_seq),
            _ => None,
        };
        let kind = tidings_log::event_kind(e.body.as_ref());
        let fate = hit.fate.unwrap_or_default();
        let recall = fate.recall.as_ref();
        Row {
            tenant: e.tenant,
            conversation: e.conversation,
            seq: e.seq,
            event_id: e.event_id,
            sender: e.sender,
            time_ms: e.server_time_ms,
            kind,
            text,
            target_seq,
            edits: fate.edits.len(),
            recalled_seq: recall.map(|r| r.seq),
            recalled_time_ms: recall.map(|r| r.time_ms),
            last_edit_text: fate.edits.into_iter().last().map(|x| x.text),
            tier: hit.tier.as_str(),
            client_msg_id: e.client_msg_id,
        }
    }

    /// The cells of its CSV record, in [`CSV_COLUMNS`] order.
    fn into_csv_cells(self) -> [String; 15] {
        let opt = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_default();
        [
            self.tenant,
            self.conversation,
            self.seq.to_string(),
            self.event_id,
            self.sender,
            rfc3339_ms(self.time_ms),
            self.kind.to_string(),
            self.text.unwrap_or_default(),
            opt(self.target_seq),
            self.edits.to_string(),
            self.last_edit_text.unwrap_or_default(),
            opt(self.recalled_seq),
            self.recalled_time_ms.map(rfc3339_ms).unwrap_or_default(),
            self.tier.to_string(),
            self.client_msg_id,
        ]
    }
}

/// Appends one RFC 4180 record (CRLF-terminated).
fn csv_record<S: AsRef<str>>(out: &mut Vec<u8>, cells: &[S]) {
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let cell = cell.as_ref().as_bytes();
        if cell
            .iter()
            .any(|b| matches!(b, b'"' | b',' | b'\r' | b'\n'))
        {
            out.push(b'"');
            for &b in cell {
                if b == b'"' {
                    out.push(b'"');
                }
                out.push(b);
            }
            out.push(b'"');
        } else {
            out.extend_from_slice(cell);
        }
    }
    out.extend_from_slice(b"\r\n");
}

fn parquet_writer(file: File) -> Result<SerializedFileWriter<File>, ParquetError> {
    let schema = Arc::new(parse_message_type(PARQUET_SCHEMA)?);
    let path = |name: &str| ColumnPath::from(name);
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL)?))
        // Unique per row: a dictionary never pays, and min/max of JSON documents mean nothing.
        .set_column_dictionary_enabled(path("event_id"), false)
        .set_column_dictionary_enabled(path("details"), false)
        .set_column_statistics_enabled(path("details"), EnabledStatistics::None)
        .build();
    SerializedFileWriter::new(file, schema, Arc::new(props))
}

/// A row group being gathered, column by column as the writer takes it.
#[derive(Default)]
struct Columns {
    tenant: Vec<ByteArray>,
    conversation: Vec<ByteArray>,
    seq: Vec<i64>,
    event_id: Vec<ByteArray>,
    sender: Vec<ByteArray>,
    time: Vec<i64>,
    kind: Vec<ByteArray>,
    text: Vec<Option<ByteArray>>,
    target_seq: Vec<Option<i64>>,
    edits: Vec<i32>,
    last_edit_text: Vec<Option<ByteArray>>,
    recalled_seq: Vec<Option<i64>>,
    recalled_time: Vec<Option<i64>>,
    tier: Vec<ByteArray>,
    client_msg_id: Vec<ByteArray>,
    details: Vec<ByteArray>,
    /// Bytes of string data held, to bound a row group of long messages.
    bytes: usize,
}

fn byte_array(s: String) -> ByteArray {
    ByteArray::from(s.into_bytes())
}

/// Seqs are u64 in events and INT64 in Parquet (which has no unsigned 64-bit type DuckDB and
/// pandas all read as a number); no real seq comes near 2^63, but do not wrap silently.
fn int64(seq: u64) -> Result<i64, String> {
    i64::try_from(seq).map_err(|_| format!("seq {seq} does not fit Parquet's INT64"))
}

impl Columns {
    fn len(&self) -> usize {
        self.seq.len()
    }

    fn push(&mut self, row: Row, details: String) -> Result<(), String> {
        // Converted first, so a failure leaves the columns all the same length.
        let seq = int64(row.seq)?;
        let target_seq = row.target_seq.map(int64).transpose()?;
        let recalled_seq = row.recalled_seq.map(int64).transpose()?;
        let edits = i32::try_from(row.edits)
            .map_err(|_| format!("{} edits do not fit Parquet's INT32", row.edits))?;
        self.bytes += row.tenant.len()
            + row.conversation.len()
            + row.event_id.len()
            + row.sender.len()
            + row.text.as_ref().map_or(0, String::len)
            + row.last_edit_text.as_ref().map_or(0, String::len)
            + row.client_msg_id.len()
            + details.len();
        self.tenant.push(byte_array(row.tenant));
        self.conversation.push(byte_array(row.conversation));
        self.seq.push(seq);
        self.event_id.push(byte_array(row.event_id));
        self.sender.push(byte_array(row.sender));
        self.time.push(row.time_ms);
        self.kind
            .push(ByteArray::from(row.kind.as_bytes().to_vec()));
        self.text.push(row.text.map(byte_array));
        self.target_seq.push(target_seq);
        self.edits.push(edits);
        self.last_edit_text.push(row.last_edit_text.map(byte_array));
        self.recalled_seq.push(recalled_seq);
        self.recalled_time.push(row.recalled_time_ms);
        self.tier
            .push(ByteArray::from(row.tier.as_bytes().to_vec()));
        self.client_msg_id.push(byte_array(row.client_msg_id));
        self.details.push(byte_array(details));
        Ok(())
    }

    /// Writes the gathered rows as one row group. Blocking.
    fn write(&self, writer: &mut SerializedFileWriter<File>) -> Result<(), ParquetError> {
        let mut group = writer.next_row_group()?;
        let mut index = 0;
        while let Some(mut column) = group.next_column()? {
            // In PARQUET_SCHEMA's order.
            match index {
                0 => required::<ByteArrayType>(&mut column, &self.tenant)?,
                1 => required::<ByteArrayType>(&mut column, &self.conversation)?,
                2 => required::<Int64Type>(&mut column, &self.seq)?,
                3 => required::<ByteArrayType>(&mut column, &self.event_id)?,
                4 => required::<ByteArrayType>(&mut column, &self.sender)?,
                5 => required::<Int64Type>(&mut column, &self.time)?,
                6 => required::<ByteArrayType>(&mut column, &self.kind)?,
                7 => optional::<ByteArrayType>(&mut column, &self.text)?,
                8 => optional::<Int64Type>(&mut column, &self.target_seq)?,
                9 => required::<Int32Type>(&mut column, &self.edits)?,
                10 => optional::<ByteArrayType>(&mut column, &self.last_edit_text)?,
                11 => optional::<Int64Type>(&mut column, &self.recalled_seq)?,
                12 => optional::<Int64Type>(&mut column, &self.recalled_time)?,
                13 => required::<ByteArrayType>(&mut column, &self.tier)?,
                14 => required::<ByteArrayType>(&mut column, &self.client_msg_id)?,
                15 => required::<ByteArrayType>(&mut column, &self.details)?,
                other => {
                    return Err(ParquetError::General(format!("unexpected column {other}")));
                }
            }
            column.close()?;
            index += 1;
        }
        group.close()?;
        Ok(())
    }
}

fn required<T: DataType>(
    column: &mut SerializedColumnWriter<'_>,
    values: &[T::T],
) -> Result<(), ParquetError> {
    column
        .typed::<T>()
        .write_batch(values, None, None)
        .map(|_| ())
}

/// An OPTIONAL column: the present values, and one definition level per row (1 present,
/// 0 null; the maximum is 1 for a top-level optional field).
fn optional<T: DataType>(
    column: &mut SerializedColumnWriter<'_>,
    values: &[Option<T::T>],
) -> Result<(), ParquetError> {
    let present: Vec<T::T> = values.iter().flatten().cloned().collect();
    let levels: Vec<i16> = values.iter().map(|v| i16::from(v.is_some())).collect();
    column
        .typed::<T>()
        .write_batch(&present, Some(&levels), None)
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    use serde_json::Value;
    use tidings_log::Event;
    use tidings_schemas::v1;

    use super::*;
    use crate::compliance::{Edit, Fate, Recall, Tier};

    /// 2026-11-29T20:33:25.123Z; event `seq` happens `seq` seconds later.
    const T0: i64 = 1_795_984_405_123;
    const POSTED: &str = "Plan: \"ship\", then\r\ncelebrate\nnow";
    const EDITED: &str = "Plan B, revised";

    fn event_id(seq: u64) -> String {
        format!("01939a2b-0000-7000-8000-{seq:012}")
    }

    fn event(seq: u64, sender: &str, client_msg_id: &str, body: Body) -> Event {
        Event {
            tenant: "acme".into(),
            conversation: "c1".into(),
            seq,
            event_id: event_id(seq),
            sender: sender.into(),
            server_time_ms: T0 + seq as i64 * 1000,
            client_msg_id: client_msg_id.into(),
            body: Some(body),
        }
    }

    fn hit(event: Event, tier: Tier, fate: Option<Fate>) -> Hit {
        Hit {
            event,
            tier,
            fate,
            matched: None,
        }
    }

    /// A message (with a comma, quotes and line breaks) that was edited and recalled, its
    /// edit and recall, a reaction, a join, and a message that reads like a formula.
    fn hits() -> Vec<Hit> {
        let posted = |text: &str| {
            Body::MessagePosted(v1::MessagePosted {
                text: text.into(),
                mentions: vec!["bob".into()],
                reply_to_seq: 0,
                mention_all: false,
            })
        };
        let fate = Fate {
            edits: vec![Edit {
                seq: 2,
                time_ms: T0 + 2000,
                sender: "alice".into(),
                text: EDITED.into(),
            }],
            recall: Some(Recall {
                seq: 3,
                time_ms: T0 + 3000,
                sender: "alice".into(),
            }),
        };
        let edited = Body::MessageEdited(v1::MessageEdited {
            target_seq: 1,
            new_text: EDITED.into(),
        });
        let recalled = Body::MessageRecalled(v1::MessageRecalled { target_seq: 1 });
        let reaction = Body::ReactionAdded(v1::ReactionAdded {
            target_seq: 1,
            reaction: "+1".into(),
        });
        let joined = Body::MemberJoined(v1::MemberJoined {
            user: "carol".into(),
            role: 0,
            role_name: String::new(),
        });
        let mut formula = hit(
            event(6, "bob", "-m6", posted("=SUM(A1:A2)")),
            Tier::Hot,
            Some(Fate::default()),
        );
        formula.matched = Some("original");
        vec![
            hit(
                event(1, "alice", "m1", posted(POSTED)),
                Tier::Archive,
                Some(fate),
            ),
            hit(event(2, "alice", "m2", edited), Tier::Archive, None),
            hit(event(3, "alice", "m3", recalled), Tier::Hot, None),
            hit(event(4, "bob", "", reaction), Tier::Hot, None),
            hit(event(5, "alice", "", joined), Tier::Hot, None),
            formula,
        ]
    }

    async fn export(path: &Path, format: Format, limits: Limits, hits: Vec<Hit>) {
        let mut file = create_with(path, format, limits).expect("create");
        for h in hits {
            file.hit(h).await.expect("hit");
        }
        file.finish().await.expect("finish");
    }

    /// Limits that write after every hit and make a row group of each.
    const TINY: Limits = Limits {
        text_buffer_bytes: 1,
        row_group_rows: 1,
        row_group_bytes: 1,
    };

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn export_reason(result: Result<ExportFile, ComplianceError>) -> String {
        match result {
            Err(ComplianceError::Export { reason, .. }) => reason,
            Err(other) => panic!("not an export error: {other}"),
            Ok(_) => panic!("the export was accepted"),
        }
    }

    #[test]
    fn format_parses_its_names_and_lists_the_choices() {
        for format in Format::ALL {
            assert_eq!(format.as_str().parse::<Format>().expect("parse"), format);
        }
        let err = "xlsx".parse::<Format>().expect_err("xlsx");
        assert!(matches!(err, ComplianceError::Invalid(_)));
        assert_eq!(
            err.to_string(),
            "invalid request: unknown export format \"xlsx\": the choices are jsonl, csv and \
             parquet"
        );
    }

    #[tokio::test]
    async fn jsonl_has_one_hit_json_object_per_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.jsonl");
        export(&path, Format::Jsonl, LIMITS, hits()).await;
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.ends_with('\n'));
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
            .collect();
        let expected: Vec<Value> = hits().iter().map(hit_json).collect();
        assert_eq!(lines, expected);
    }

    #[tokio::test]
    async fn csv_is_rfc_4180_with_cells_as_they_are() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.csv");
        export(&path, Format::Csv, LIMITS, hits()).await;
        let text = std::fs::read_to_string(&path).expect("read");
        let id = |seq| event_id(seq);
        let expected = [
            "tenant,conversation,seq,event_id,sender,time,kind,text,target_seq,edits,\
             last_edit_text,recalled_seq,recalled_time,tier,client_msg_id\r\n"
                .to_string(),
            format!(
                "acme,c1,1,{},alice,2026-11-29T20:33:26.123Z,message_posted,\
                 \"Plan: \"\"ship\"\", then\r\ncelebrate\nnow\",,1,\"Plan B, revised\",3,\
                 2026-11-29T20:33:28.123Z,archive,m1\r\n",
                id(1)
            ),
            format!(
                "acme,c1,2,{},alice,2026-11-29T20:33:27.123Z,message_edited,\
                 \"Plan B, revised\",1,0,,,,archive,m2\r\n",
                id(2)
            ),
            format!(
                "acme,c1,3,{},alice,2026-11-29T20:33:28.123Z,message_recalled,,1,0,,,,hot,m3\r\n",
                id(3)
            ),
            format!(
                "acme,c1,4,{},bob,2026-11-29T20:33:29.123Z,reaction_added,,1,0,,,,hot,\r\n",
                id(4)
            ),
            format!(
                "acme,c1,5,{},alice,2026-11-29T20:33:30.123Z,member_joined,,,0,,,,hot,\r\n",
                id(5)
            ),
            format!(
                "acme,c1,6,{},bob,2026-11-29T20:33:31.123Z,message_posted,=SUM(A1:A2),,0,,,,\
                 hot,-m6\r\n",
                id(6)
            ),
        ]
        .concat();
        assert_eq!(text, expected);

        // And a plain RFC 4180 reader gets every cell back as it was.
        let records = parse_rfc_4180(&text);
        assert_eq!(records.len(), 7);
        assert!(records.iter().all(|r| r.len() == CSV_COLUMNS.len()));
        assert_eq!(records[0], CSV_COLUMNS);
        assert_eq!(records[1][7], POSTED);
        assert_eq!(records[1][10], EDITED);
        assert_eq!(records[6][7], "=SUM(A1:A2)");
    }

    /// A minimal RFC 4180 reader: quoted cells with doubled quotes, CRLF or LF records.
    fn parse_rfc_4180(data: &str) -> Vec<Vec<String>> {
        let (mut records, mut record, mut cell) = (Vec::new(), Vec::new(), String::new());
        let mut chars = data.chars().peekable();
        let mut quoted = false;
        while let Some(c) = chars.next() {
            match (quoted, c) {
                (true, '"') if chars.peek() == Some(&'"') => {
                    chars.next();
                    cell.push('"');
                }
                (true, '"') => quoted = false,
                (true, c) => cell.push(c),
                (false, '"') => quoted = true,
                (false, ',') => record.push(std::mem::take(&mut cell)),
                (false, '\r') if chars.peek() == Some(&'\n') => {}
                (false, '\n') => {
                    record.push(std::mem::take(&mut cell));
                    records.push(std::mem::take(&mut record));
                }
                (false, c) => cell.push(c),
            }
        }
        assert!(
            !quoted && record.is_empty() && cell.is_empty(),
            "truncated CSV"
        );
        records
    }

    #[tokio::test]
    async fn small_buffers_write_the_same_text_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        for format in [Format::Jsonl, Format::Csv] {
            let whole = dir.path().join(format!("whole.{format}"));
            let piecemeal = dir.path().join(format!("piecemeal.{format}"));
            export(&whole, format, LIMITS, hits()).await;
            export(&piecemeal, format, TINY, hits()).await;
            assert_eq!(
                std::fs::read(&whole).expect("read"),
                std::fs::read(&piecemeal).expect("read"),
                "{format}"
            );
        }
    }

    fn read_parquet(path: &Path) -> SerializedFileReader<File> {
        SerializedFileReader::new(File::open(path).expect("open")).expect("a Parquet file")
    }

    #[tokio::test]
    async fn parquet_reads_back_every_column_with_nulls() {
        let str = |s: &str| Field::Str(s.to_string());
        let dir = tempfile::tempdir().expect("tempdir");
        let four_rows = Limits {
            row_group_rows: 4,
            ..LIMITS
        };
        // One row group; groups of 4 rows (4 + 2); a group per row, by the byte limit.
        for (limits, groups) in [(LIMITS, 1), (four_rows, 2), (TINY, 6)] {
            let path = dir.path().join(format!("out-{groups}.parquet"));
            export(&path, Format::Parquet, limits, hits()).await;
            let reader = read_parquet(&path);
            let meta = reader.metadata();
            assert_eq!(meta.file_metadata().num_rows(), 6);
            assert_eq!(meta.num_row_groups(), groups);
            let rows: Vec<Vec<(String, Field)>> = reader
                .into_iter()
                .map(|row| {
                    row.expect("row")
                        .get_column_iter()
                        .map(|(name, field)| (name.clone(), field.clone()))
                        .collect()
                })
                .collect();
            assert_eq!(rows.len(), 6);
            // (text, target_seq, edits, last_edit_text, recall, tier, client_msg_id)
            type Expected<'a> = (
                Option<&'a str>,
                Option<i64>,
                i32,
                Option<&'a str>,
                Option<(i64, i64)>,
                &'a str,
                &'a str,
            );
            let expected: [Expected; 6] = [
                (
                    Some(POSTED),
                    None,
                    1,
                    Some(EDITED),
                    Some((3, T0 + 3000)),
                    "archive",
                    "m1",
                ),
                (Some(EDITED), Some(1), 0, None, None, "archive", "m2"),
                (None, Some(1), 0, None, None, "hot", "m3"),
                (None, Some(1), 0, None, None, "hot", ""),
                (None, None, 0, None, None, "hot", ""),
                (Some("=SUM(A1:A2)"), None, 0, None, None, "hot", "-m6"),
            ];
            for ((row, h), (text, target, edits, last_edit, recall, tier, cmid)) in
                rows.iter().zip(hits()).zip(expected)
            {
                let e = &h.event;
                let null_or = |v: Option<Field>| v.unwrap_or(Field::Null);
                let want: Vec<(String, Field)> = [
                    ("tenant", str("acme")),
                    ("conversation", str("c1")),
                    ("seq", Field::Long(e.seq as i64)),
                    ("event_id", str(&e.event_id)),
                    ("sender", str(&e.sender)),
                    ("time", Field::TimestampMillis(e.server_time_ms)),
                    ("kind", str(tidings_log::event_kind(e.body.as_ref()))),
                    ("text", null_or(text.map(str))),
                    ("target_seq", null_or(target.map(Field::Long))),
                    ("edits", Field::Int(edits)),
                    ("last_edit_text", null_or(last_edit.map(str))),
                    ("recalled_seq", null_or(recall.map(|r| Field::Long(r.0)))),
                    (
                        "recalled_time",
                        null_or(recall.map(|r| Field::TimestampMillis(r.1))),
                    ),
                    ("tier", str(tier)),
                    ("client_msg_id", str(cmid)),
                ]
                .into_iter()
                .map(|(n, f)| (n.to_string(), f))
                .collect();
                assert_eq!(row[..15], want[..], "seq {}", e.seq);
                let Field::Str(details) = &row[15].1 else {
                    panic!("details is not a string: {:?}", row[15]);
                };
                assert_eq!(row[15].0, "details");
                let details: Value = serde_json::from_str(details).expect("details JSON");
                assert_eq!(details, hit_json(&h));
            }
        }
    }

    #[tokio::test]
    async fn empty_parquet_export_is_a_valid_file_with_the_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("empty.parquet");
        export(&path, Format::Parquet, LIMITS, Vec::new()).await;
        let reader = read_parquet(&path);
        let meta = reader.metadata();
        assert_eq!(meta.file_metadata().num_rows(), 0);
        assert_eq!(meta.num_row_groups(), 0);
        let columns: Vec<&str> = meta
            .file_metadata()
            .schema_descr()
            .columns()
            .iter()
            .map(|c| c.name())
            .collect();
        let mut expected = CSV_COLUMNS.to_vec();
        expected.push("details");
        assert_eq!(columns, expected);
        assert_eq!(reader.into_iter().count(), 0);
    }

    #[tokio::test]
    async fn finish_leaves_exactly_the_target_file() {
        for format in Format::ALL {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join(format!("out.{format}"));
            export(&path, format, TINY, hits()).await;
            assert_eq!(names(dir.path()), [format!("out.{format}")], "{format}");
        }
    }

    #[tokio::test]
    async fn dropping_without_finish_leaves_no_file() {
        for format in Format::ALL {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join(format!("out.{format}"));
            let mut file = create_with(&path, format, TINY).expect("create");
            for h in hits() {
                file.hit(h).await.expect("hit");
            }
            assert_eq!(names(dir.path()).len(), 1, "the temporary file");
            drop(file);
            assert!(names(dir.path()).is_empty(), "{format}");
        }
    }

    #[tokio::test]
    async fn existing_path_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("evidence.csv");
        std::fs::write(&path, b"earlier export").expect("write");
        for format in Format::ALL {
            let reason = export_reason(create(&path, format));
            assert!(reason.contains("already exists"), "{reason}");
        }
        assert_eq!(std::fs::read(&path).expect("read"), b"earlier export");
        assert_eq!(names(dir.path()), ["evidence.csv"]);
    }

    #[tokio::test]
    async fn a_directory_at_the_path_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("out")).expect("mkdir");
        let reason = export_reason(create(&dir.path().join("out"), Format::Jsonl));
        assert!(reason.contains("is a directory"), "{reason}");
        assert_eq!(names(dir.path()), ["out"]);
    }

    #[tokio::test]
    async fn missing_directory_is_refused_leaving_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nowhere").join("out.csv");
        let reason = export_reason(create(&path, Format::Csv));
        assert!(reason.contains("does not exist"), "{reason}");
        assert!(names(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn unwritable_directory_is_refused_leaving_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let locked = dir.path().join("locked");
        std::fs::create_dir(&locked).expect("mkdir");
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o500)).expect("chmod");
        // Root (or CAP_DAC_OVERRIDE) writes regardless of the mode: ask the kernel.
        let probe = locked.join("probe");
        if File::create(&probe).is_ok() {
            std::fs::remove_file(&probe).expect("remove probe");
            eprintln!(
                "skipped: this process can write into a mode 0500 directory (running as root?), \
                 so the refusal cannot be observed"
            );
        } else {
            for format in Format::ALL {
                let reason = export_reason(create(&locked.join("out"), format));
                assert!(reason.contains("cannot create a file"), "{reason}");
            }
            assert!(names(&locked).is_empty());
        }
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    }

    #[tokio::test]
    async fn finish_does_not_replace_a_file_that_appeared_meanwhile() {
        for format in Format::ALL {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("out");
            let mut file = create(&path, format).expect("create");
            for h in hits() {
                file.hit(h).await.expect("hit");
            }
            std::fs::write(&path, b"someone else's").expect("write");
            let err = file.finish().await.expect_err("finish over a file");
            assert!(
                matches!(&err, ComplianceError::Export { reason, .. } if reason.contains("appeared")),
                "{err}"
            );
            assert_eq!(std::fs::read(&path).expect("read"), b"someone else's");
            assert_eq!(names(dir.path()), ["out"], "{format}");
            // The export is dead: no more hits, no second finish.
            assert!(file.hit(hits().remove(0)).await.is_err());
            assert!(file.finish().await.is_err());
        }
    }

    #[tokio::test]
    async fn nothing_is_accepted_after_finish() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.jsonl");
        let mut file = create(&path, Format::Jsonl).expect("create");
        file.finish().await.expect("finish");
        assert!(file.hit(hits().remove(0)).await.is_err());
        drop(file);
        assert_eq!(std::fs::read(&path).expect("read"), b"");
        assert_eq!(names(dir.path()), ["out.jsonl"]);
    }
}
