//! The segment format: one Parquet object per (tenant, date) batch of events.
//!
//! Rows are sorted by (conversation, seq). Routing metadata is plain so data tools can count
//! and group without keys; the body is sealed (see `codec`). ZSTD compression, page-level
//! statistics with the page index, and bloom filters on conversation and sender let readers
//! skip row groups and pages. The same writer produces the plaintext baseline the benchmark
//! compares against (`Body::Plain`), so the two differ only in the body column.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use parquet::basic::{Compression, ZstdLevel};
use parquet::column::reader::get_typed_column_reader;
use parquet::data_type::{ByteArray, ByteArrayType, DataType, Int32Type, Int64Type};
use parquet::errors::ParquetError;
use parquet::file::metadata::{
    KeyValue, PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader, SortingColumn,
};
use parquet::file::properties::{EnabledStatistics, ReaderProperties, WriterProperties};
use parquet::file::reader::{ChunkReader, Length, RowGroupReader};
use parquet::file::serialized_reader::SerializedRowGroupReader;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use parquet::schema::types::ColumnPath;

/// Bumped when the layout changes incompatibly; readers refuse versions they do not know.
pub const FORMAT_VERSION: &str = "1";

const SCHEMA: &str = "message tidings_event {
    REQUIRED BYTE_ARRAY tenant (STRING);
    REQUIRED BYTE_ARRAY conversation (STRING);
    REQUIRED INT64 seq;
    REQUIRED BYTE_ARRAY event_id (STRING);
    REQUIRED BYTE_ARRAY sender (STRING);
    REQUIRED INT64 time (TIMESTAMP(MILLIS, true));
    REQUIRED BYTE_ARRAY kind (STRING);
    REQUIRED INT32 key_id;
    REQUIRED INT32 body_size;
    REQUIRED BYTE_ARRAY body;
    REQUIRED BYTE_ARRAY client_msg_id (STRING);
}";

/// Column positions in `SCHEMA`.
pub mod col {
    pub const TENANT: usize = 0;
    pub const CONVERSATION: usize = 1;
    pub const SEQ: usize = 2;
    pub const EVENT_ID: usize = 3;
    pub const SENDER: usize = 4;
    pub const TIME: usize = 5;
    pub const KIND: usize = 6;
    pub const KEY_ID: usize = 7;
    pub const BODY_SIZE: usize = 8;
    pub const BODY: usize = 9;
    pub const CLIENT_MSG_ID: usize = 10;
    pub const COUNT: usize = 11;
}

/// Footer key-value metadata names.
pub mod meta {
    pub const FORMAT: &str = "tidings.format";
    pub const TENANT: &str = "tidings.tenant";
    pub const SEGMENT: &str = "tidings.segment";
    pub const KEY_ID: &str = "tidings.key_id";
    /// The segment's zstd dictionary for bodies, sealed, base64.
    pub const DICT: &str = "tidings.dict";
}

/// One archived event as stored: metadata in the clear, the body as written (sealed in a
/// segment, plain in the baseline).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub conversation: String,
    pub seq: u64,
    pub event_id: String,
    pub sender: String,
    pub time_ms: i64,
    pub kind: String,
    pub key_id: u32,
    /// Size of the encoded body before compression and sealing.
    pub body_size: u32,
    pub body: Vec<u8>,
    /// The sender's id for the message (dedupe token), as plain as in the hot log's keys.
    pub client_msg_id: String,
}

/// How the body column is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// Sealed bytes: already compressed before sealing, so the column is stored as is.
    Sealed,
    /// Plaintext (the benchmark baseline): ZSTD like every other column.
    Plain,
}

#[derive(Clone, Debug)]
pub struct WriteOptions {
    pub row_group_rows: usize,
    pub zstd_level: i32,
    pub body: Body,
    pub metadata: Vec<(String, String)>,
}

/// Rows per data page: small enough that a point lookup through the page index decodes a
/// few KiB, large enough that page headers stay negligible.
const PAGE_ROWS: usize = 2048;

fn writer_properties(opts: &WriteOptions, rows: usize) -> Result<WriterProperties, ParquetError> {
    let level = ZstdLevel::try_new(opts.zstd_level)?;
    let path = |name: &str| ColumnPath::from(name);
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_data_page_row_count_limit(PAGE_ROWS)
        .set_write_batch_size(PAGE_ROWS.min(1024))
        .set_max_row_group_row_count(Some(opts.row_group_rows))
        .set_sorting_columns(Some(vec![
            SortingColumn {
                column_idx: col::CONVERSATION as i32,
                descending: false,
                nulls_first: false,
            },
            SortingColumn {
                column_idx: col::SEQ as i32,
                descending: false,
                nulls_first: false,
            },
        ]))
        // Bodies are unique: a dictionary never pays, and min/max of them mean nothing.
        .set_column_dictionary_enabled(path("body"), false)
        .set_column_statistics_enabled(path("body"), EnabledStatistics::None)
        .set_column_dictionary_enabled(path("event_id"), false)
        .set_column_dictionary_enabled(path("client_msg_id"), false)
        .set_key_value_metadata(Some(
            opts.metadata
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
                .collect(),
        ));
    let ndv = rows.min(opts.row_group_rows).max(1) as u64;
    for name in ["conversation", "sender"] {
        props = props
            .set_column_bloom_filter_enabled(path(name), true)
            .set_column_bloom_filter_fpp(path(name), 0.01)
            .set_column_bloom_filter_max_ndv(path(name), ndv);
    }
    if opts.body == Body::Sealed {
        props = props.set_column_compression(path("body"), Compression::UNCOMPRESSED);
    }
    Ok(props.build())
}

/// Writes `rows` (sorted by conversation, seq) as one Parquet object. Row `i` lands in row
/// group `i / row_group_rows` at offset `i % row_group_rows`.
pub fn write_segment(
    tenant: &str,
    rows: &[Row],
    opts: &WriteOptions,
) -> Result<Vec<u8>, ParquetError> {
    if opts.row_group_rows == 0 {
        return Err(ParquetError::General(
            "row_group_rows must be positive".into(),
        ));
    }
    let schema = Arc::new(parse_message_type(SCHEMA)?);
    let props = Arc::new(writer_properties(opts, rows.len())?);
    let mut writer = SerializedFileWriter::new(Vec::new(), schema, props)?;
    for group in rows.chunks(opts.row_group_rows) {
        let mut rg = writer.next_row_group()?;
        let mut index = 0;
        while let Some(mut column) = rg.next_column()? {
            let strings = |f: fn(&Row) -> &[u8]| -> Vec<ByteArray> {
                group
                    .iter()
                    .map(|r| ByteArray::from(f(r).to_vec()))
                    .collect()
            };
            match index {
                col::TENANT => {
                    let value = ByteArray::from(tenant.as_bytes().to_vec());
                    write(&mut column, &vec![value; group.len()])?
                }
                col::CONVERSATION => write(&mut column, &strings(|r| r.conversation.as_bytes()))?,
                col::SEQ => write_i64(&mut column, group.iter().map(|r| r.seq as i64))?,
                col::EVENT_ID => write(&mut column, &strings(|r| r.event_id.as_bytes()))?,
                col::SENDER => write(&mut column, &strings(|r| r.sender.as_bytes()))?,
                col::TIME => write_i64(&mut column, group.iter().map(|r| r.time_ms))?,
                col::KIND => write(&mut column, &strings(|r| r.kind.as_bytes()))?,
                col::KEY_ID => write_i32(&mut column, group.iter().map(|r| r.key_id as i32))?,
                col::BODY_SIZE => write_i32(&mut column, group.iter().map(|r| r.body_size as i32))?,
                col::BODY => write(&mut column, &strings(|r| r.body.as_slice()))?,
                col::CLIENT_MSG_ID => write(&mut column, &strings(|r| r.client_msg_id.as_bytes()))?,
                other => {
                    return Err(ParquetError::General(format!("unexpected column {other}")));
                }
            }
            column.close()?;
            index += 1;
        }
        rg.close()?;
    }
    // Writes the footer and hands back the buffer.
    writer.into_inner()
}

fn write(
    column: &mut parquet::file::writer::SerializedColumnWriter<'_>,
    values: &[ByteArray],
) -> Result<(), ParquetError> {
    column
        .typed::<ByteArrayType>()
        .write_batch(values, None, None)
        .map(|_| ())
}

fn write_i64(
    column: &mut parquet::file::writer::SerializedColumnWriter<'_>,
    values: impl Iterator<Item = i64>,
) -> Result<(), ParquetError> {
    let values: Vec<i64> = values.collect();
    column
        .typed::<Int64Type>()
        .write_batch(&values, None, None)
        .map(|_| ())
}

fn write_i32(
    column: &mut parquet::file::writer::SerializedColumnWriter<'_>,
    values: impl Iterator<Item = i32>,
) -> Result<(), ParquetError> {
    let values: Vec<i32> = values.collect();
    column
        .typed::<Int32Type>()
        .write_batch(&values, None, None)
        .map(|_| ())
}

/// Part of an object held in memory: the bytes at `base..base + bytes.len()` of an object
/// `len` bytes long. Parquet reads through it; a read outside what was fetched is an error,
/// which is how the footer reader learns it must fetch more.
#[derive(Clone)]
pub struct Fetched {
    pub base: u64,
    pub bytes: Bytes,
    pub len: u64,
}

impl Fetched {
    pub fn whole(bytes: Bytes) -> Self {
        Fetched {
            base: 0,
            len: bytes.len() as u64,
            bytes,
        }
    }

    fn slice(&self, start: u64, length: usize) -> Result<Bytes, ParquetError> {
        let from = start
            .checked_sub(self.base)
            .map(|d| d as usize)
            .filter(|from| from.saturating_add(length) <= self.bytes.len())
            .ok_or_else(|| {
                ParquetError::General(format!(
                    "bytes {start}..{} were not fetched ({}..{})",
                    start + length as u64,
                    self.base,
                    self.base + self.bytes.len() as u64
                ))
            })?;
        Ok(self.bytes.slice(from..from + length))
    }
}

impl Length for Fetched {
    fn len(&self) -> u64 {
        self.len
    }
}

impl ChunkReader for Fetched {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> Result<Self::T, ParquetError> {
        let end = self.base + self.bytes.len() as u64;
        let length = end.saturating_sub(start) as usize;
        Ok(self.slice(start, length)?.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> Result<Bytes, ParquetError> {
        self.slice(start, length)
    }
}

/// A segment's footer: Parquet metadata with the page index, and the tidings key-values.
#[derive(Debug)]
pub struct Footer {
    pub meta: Arc<ParquetMetaData>,
    pub kv: HashMap<String, String>,
    pub len: u64,
}

impl Footer {
    /// Parses the footer from the object's tail (`tail` must end at the object's end).
    /// Fails if the tail is too short; the caller fetches more and tries again.
    pub fn parse(tail: &Fetched) -> Result<Footer, ParquetError> {
        let mut reader =
            ParquetMetaDataReader::new().with_page_index_policy(PageIndexPolicy::Required);
        reader.try_parse(tail)?;
        let meta = reader.finish()?;
        let kv = meta
            .file_metadata()
            .key_value_metadata()
            .map(|kvs| {
                kvs.iter()
                    .filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Footer {
            meta: Arc::new(meta),
            kv,
            len: tail.len,
        })
    }

    pub fn rows(&self) -> u64 {
        self.meta.file_metadata().num_rows().max(0) as u64
    }

    /// Byte range of a row group's column chunks: one request fetches all of it.
    pub fn row_group_range(&self, rg: usize) -> Option<Range<u64>> {
        self.columns_range(rg, 0..col::COUNT)
    }

    /// Byte range of a row group's plain metadata columns (every column before the body):
    /// what a filter on conversation, sender, time or kind needs, a small part of the group.
    pub fn meta_range(&self, rg: usize) -> Option<Range<u64>> {
        self.columns_range(rg, 0..col::BODY)
    }

    fn columns_range(&self, rg: usize, columns: Range<usize>) -> Option<Range<u64>> {
        let group = self.meta.row_groups().get(rg)?;
        let mut start = u64::MAX;
        let mut end = 0u64;
        for column in group.columns().get(columns)? {
            let (s, len) = column.byte_range();
            start = start.min(s);
            end = end.max(s + len);
        }
        (start < end).then_some(start..end)
    }
}

/// Reads rows `offset..offset + n` of row group `rg` from `data` (which must hold the row
/// group's bytes). With the page index, whole pages before `offset` are skipped without
/// being decompressed; without it every page up to `offset` is decoded.
pub fn read_rows(
    footer: &Footer,
    data: &Fetched,
    rg: usize,
    offset: usize,
    n: usize,
    use_page_index: bool,
) -> Result<Vec<Row>, ParquetError> {
    read_runs(footer, data, rg, &[(offset, n)], use_page_index)
}

/// Reads the rows at `indices` (ascending) of row group `rg`: pages holding none of them are
/// skipped through the page index, and only the wanted rows are materialised. What a search
/// that opens a few candidate rows of a large group needs.
pub fn read_rows_at(
    footer: &Footer,
    data: &Fetched,
    rg: usize,
    indices: &[usize],
) -> Result<Vec<Row>, ParquetError> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &i in indices {
        match runs.last_mut() {
            Some((start, len)) if *start + *len == i => *len += 1,
            Some((start, len)) if *start + *len > i => {
                return Err(ParquetError::General(format!(
                    "row indices must ascend ({i} after {})",
                    *start + *len - 1
                )));
            }
            _ => runs.push((i, 1)),
        }
    }
    read_runs(footer, data, rg, &runs, true)
}

/// Rows of the (start, len) runs, in order.
fn read_runs(
    footer: &Footer,
    data: &Fetched,
    rg: usize,
    runs: &[(usize, usize)],
    use_page_index: bool,
) -> Result<Vec<Row>, ParquetError> {
    let reader = row_group_reader(footer, data, rg, use_page_index)?;
    let strings = |idx| -> Result<Vec<String>, ParquetError> {
        read_column::<ByteArrayType>(&reader, idx, runs)?
            .iter()
            .map(utf8)
            .collect()
    };
    let conversation = strings(col::CONVERSATION)?;
    let seq = read_column::<Int64Type>(&reader, col::SEQ, runs)?;
    let event_id = strings(col::EVENT_ID)?;
    let sender = strings(col::SENDER)?;
    let time = read_column::<Int64Type>(&reader, col::TIME, runs)?;
    let kind = strings(col::KIND)?;
    let key_id = read_column::<Int32Type>(&reader, col::KEY_ID, runs)?;
    let body_size = read_column::<Int32Type>(&reader, col::BODY_SIZE, runs)?;
    let body = read_column::<ByteArrayType>(&reader, col::BODY, runs)?;
    let client_msg_id = strings(col::CLIENT_MSG_ID)?;
    let mut columns = (
        conversation.into_iter(),
        seq.into_iter(),
        event_id.into_iter(),
        sender.into_iter(),
        time.into_iter(),
        kind.into_iter(),
        key_id.into_iter(),
        body_size.into_iter(),
        body.into_iter(),
        client_msg_id.into_iter(),
    );
    let n = columns.1.len();
    let mut rows = Vec::with_capacity(n);
    let short = || ParquetError::General("columns of unequal length".into());
    for _ in 0..n {
        rows.push(Row {
            conversation: columns.0.next().ok_or_else(short)?,
            seq: columns.1.next().ok_or_else(short)? as u64,
            event_id: columns.2.next().ok_or_else(short)?,
            sender: columns.3.next().ok_or_else(short)?,
            time_ms: columns.4.next().ok_or_else(short)?,
            kind: columns.5.next().ok_or_else(short)?,
            key_id: columns.6.next().ok_or_else(short)? as u32,
            body_size: columns.7.next().ok_or_else(short)? as u32,
            body: columns.8.next().ok_or_else(short)?.data().to_vec(),
            client_msg_id: columns.9.next().ok_or_else(short)?,
        });
    }
    Ok(rows)
}

/// The (conversation, seq) of every row of a row group, in order: what verification and
/// index-free lookups scan.
pub fn read_keys(
    footer: &Footer,
    data: &Fetched,
    rg: usize,
) -> Result<Vec<(String, u64)>, ParquetError> {
    let reader = row_group_reader(footer, data, rg, false)?;
    let n = reader.metadata().num_rows().max(0) as usize;
    let convs = read_column::<ByteArrayType>(&reader, col::CONVERSATION, &[(0, n)])?;
    let seqs = read_column::<Int64Type>(&reader, col::SEQ, &[(0, n)])?;
    convs
        .iter()
        .zip(seqs)
        .map(|(c, s)| Ok((utf8(c)?, s as u64)))
        .collect()
}

/// The columns a compliance filter looks at, for every row of a row group.
pub struct MetaColumns {
    pub conversation: Vec<ByteArray>,
    pub seq: Vec<i64>,
    pub sender: Vec<ByteArray>,
    pub time: Vec<i64>,
    pub kind: Vec<ByteArray>,
}

/// Reads [`MetaColumns`] of row group `rg`; `data` needs only [`Footer::meta_range`].
pub fn read_meta(footer: &Footer, data: &Fetched, rg: usize) -> Result<MetaColumns, ParquetError> {
    let reader = row_group_reader(footer, data, rg, false)?;
    let n = reader.metadata().num_rows().max(0) as usize;
    Ok(MetaColumns {
        conversation: read_column::<ByteArrayType>(&reader, col::CONVERSATION, &[(0, n)])?,
        seq: read_column::<Int64Type>(&reader, col::SEQ, &[(0, n)])?,
        sender: read_column::<ByteArrayType>(&reader, col::SENDER, &[(0, n)])?,
        time: read_column::<Int64Type>(&reader, col::TIME, &[(0, n)])?,
        kind: read_column::<ByteArrayType>(&reader, col::KIND, &[(0, n)])?,
    })
}

/// A reader of row group `rg` over `data`, with the page index (so skipped pages are not
/// decompressed) or without it.
fn row_group_reader<'a>(
    footer: &'a Footer,
    data: &Fetched,
    rg: usize,
    use_page_index: bool,
) -> Result<SerializedRowGroupReader<'a, Fetched>, ParquetError> {
    let group = footer
        .meta
        .row_groups()
        .get(rg)
        .ok_or_else(|| ParquetError::General(format!("no row group {rg}")))?;
    let page_index = if use_page_index {
        footer.meta.page_index_for_row_group(rg)
    } else {
        parquet::file::metadata::page_index::RowGroupPageIndex::new(rg, None)
    };
    let props = Arc::new(ReaderProperties::builder().build());
    SerializedRowGroupReader::new(Arc::new(data.clone()), group, page_index, props)
}

fn utf8(b: &ByteArray) -> Result<String, ParquetError> {
    String::from_utf8(b.data().to_vec())
        .map_err(|_| ParquetError::General("string column is not UTF-8".into()))
}

/// Where the row group's bloom filter on `column` is stored, when it has one whose length
/// the footer records.
pub fn bloom_range(footer: &Footer, rg: usize, column: usize) -> Option<Range<u64>> {
    let chunk = footer.meta.row_groups().get(rg)?.columns().get(column)?;
    let start = u64::try_from(chunk.bloom_filter_offset()?).ok()?;
    let len = u64::try_from(chunk.bloom_filter_length()?).ok()?;
    Some(start..start + len)
}

/// Whether the row group's bloom filter on `column` may contain `value` (true when the
/// row group has no filter). Needs the filter's bytes in `data`.
pub fn bloom_may_contain(
    footer: &Footer,
    data: &Fetched,
    rg: usize,
    column: usize,
    value: &str,
) -> Result<bool, ParquetError> {
    let Some(chunk) = footer
        .meta
        .row_groups()
        .get(rg)
        .and_then(|g| g.columns().get(column))
    else {
        return Ok(true);
    };
    match parquet::bloom_filter::Sbbf::read_from_column_chunk(chunk, data)? {
        Some(filter) => Ok(filter.check(&ByteArray::from(value))),
        None => Ok(true),
    }
}

fn read_column<T: DataType>(
    reader: &SerializedRowGroupReader<'_, Fetched>,
    idx: usize,
    runs: &[(usize, usize)],
) -> Result<Vec<T::T>, ParquetError> {
    let mut column = get_typed_column_reader::<T>(reader.get_column_reader(idx)?);
    let mut values = Vec::with_capacity(runs.iter().map(|r| r.1).sum());
    let mut at = 0;
    for &(offset, n) in runs {
        if offset > at {
            let gap = offset - at;
            let skipped = column.skip_records(gap)?;
            if skipped != gap {
                return Err(ParquetError::General(format!(
                    "column {idx} has {} rows, not the {offset} to skip",
                    at + skipped
                )));
            }
        }
        let want = values.len() + n;
        while values.len() < want {
            let before = values.len();
            column.read_records(want - before, None, None, &mut values)?;
            if values.len() == before {
                break;
            }
        }
        if values.len() != want {
            return Err(ParquetError::General(format!(
                "column {idx} ends before row {}",
                offset + n
            )));
        }
        at = offset + n;
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize) -> Vec<Row> {
        (0..n)
            .map(|i| Row {
                conversation: format!("c{}", i / 1000),
                seq: (i % 1000) as u64 + 1,
                event_id: format!("e{i}"),
                sender: format!("u{}", i % 7),
                time_ms: i as i64,
                kind: "message_posted".into(),
                key_id: 1,
                body_size: 3,
                body: format!("b{i}").into_bytes(),
                client_msg_id: format!("m{i}"),
            })
            .collect()
    }

    #[test]
    fn rows_at_indices_are_exactly_those_rows_across_pages() {
        let written = rows(5000);
        let opts = WriteOptions {
            row_group_rows: 8192,
            zstd_level: 1,
            body: Body::Plain,
            metadata: Vec::new(),
        };
        let bytes = write_segment("acme", &written, &opts).expect("write");
        let data = Fetched::whole(Bytes::from(bytes));
        let footer = Footer::parse(&data).expect("footer");
        let wanted = [0, 1, 2, 2047, 2048, 2049, 4097, 4999];
        let got = read_rows_at(&footer, &data, 0, &wanted).expect("read");
        let expected: Vec<Row> = wanted.iter().map(|&i| written[i].clone()).collect();
        assert_eq!(got, expected);
        assert!(
            read_rows_at(&footer, &data, 0, &[])
                .expect("none")
                .is_empty()
        );
        assert!(read_rows_at(&footer, &data, 0, &[5, 3]).is_err());
        assert!(read_rows_at(&footer, &data, 0, &[4999, 5000]).is_err());
        assert_eq!(
            read_rows(&footer, &data, 0, 0, 5000, false).expect("all"),
            written
        );
    }
}
