//! Export files: JSONL, CSV and Parquet. (Placeholder API; the full writers land next.)

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{ComplianceError, Hit, Sink, hit_json};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
    Parquet,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
            Format::Parquet => "parquet",
        }
    }
}

pub struct ExportFile {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
}

pub fn create(path: &Path, format: Format) -> Result<ExportFile, ComplianceError> {
    let err = |e: std::io::Error| ComplianceError::Export {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    if format != Format::Jsonl {
        return Err(ComplianceError::invalid("only jsonl for now"));
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(err)?;
    Ok(ExportFile {
        path: path.to_path_buf(),
        out: std::io::BufWriter::new(file),
    })
}

#[async_trait::async_trait]
impl Sink for ExportFile {
    async fn hit(&mut self, hit: Hit) -> Result<(), ComplianceError> {
        writeln!(self.out, "{}", hit_json(&hit)).map_err(|e| ComplianceError::Export {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        })
    }
}
