//! Where segments live: a local directory (the default) or an S3 bucket, both through
//! `object_store`, and the Hive-style object paths.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::error::ArchiveError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageConfig {
    /// A directory on this machine.
    Local { root: PathBuf },
    /// An S3-compatible bucket. Credentials come from the environment
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), never the config
    /// file.
    S3(S3Config),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Config {
    /// Endpoint URL for S3-compatible servers (Garage, MinIO, ...); AWS when unset.
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    /// Key prefix inside the bucket, so several deployments can share one.
    pub prefix: String,
    /// Allow `http://` endpoints (test and private networks only).
    pub allow_http: bool,
    /// How long one request may keep retrying (with exponential backoff) before it fails.
    pub retry_timeout: Duration,
    /// Credentials given directly (tests, embedding programs); the environment otherwise.
    pub credentials: Option<(String, String)>,
}

/// The archive's object store.
#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    /// For the local store: the directory, so writes can be fsync'd (object_store renames a
    /// finished temp file into place but does not sync it).
    local_root: Option<PathBuf>,
    describe: String,
    /// Where the segments' search indexes live: a sibling of the archive (`<root>.search`,
    /// or the S3 prefix `<prefix>.search`), so that data tools reading the archive directory
    /// see only Parquet (Polars refuses a directory holding other files). `None` for the
    /// sibling itself.
    search: Option<Arc<Objects>>,
}

/// One object found by [`Objects::list`].
#[derive(Clone, Debug)]
pub struct Listed {
    pub path: String,
    pub size: u64,
    pub modified_ms: i64,
}

impl StorageConfig {
    /// The sibling location of the search indexes (see [`Objects::search_indexes`]).
    pub fn search_sibling(&self) -> Result<StorageConfig, ArchiveError> {
        match self {
            StorageConfig::Local { root } => {
                let name = root.file_name().ok_or_else(|| {
                    ArchiveError::Config(format!(
                        "archive directory {} has no name to put `.search` beside",
                        root.display()
                    ))
                })?;
                let mut sibling = name.to_os_string();
                sibling.push(".search");
                Ok(StorageConfig::Local {
                    root: root.with_file_name(sibling),
                })
            }
            StorageConfig::S3(s3) => {
                let prefix = s3.prefix.trim_matches('/');
                Ok(StorageConfig::S3(S3Config {
                    prefix: if prefix.is_empty() {
                        "_search".to_string()
                    } else {
                        format!("{prefix}.search")
                    },
                    ..s3.clone()
                }))
            }
        }
    }
}

impl Objects {
    /// The archive at `cfg`, with its search indexes beside it.
    pub fn open(cfg: &StorageConfig) -> Result<Objects, ArchiveError> {
        let mut objects = Objects::open_one(cfg)?;
        objects.search = Some(Arc::new(Objects::open_one(&cfg.search_sibling()?)?));
        Ok(objects)
    }

    /// Where the segments' search indexes are stored: a sibling of the archive, outside the
    /// directory data tools read.
    pub fn search_indexes(&self) -> &Objects {
        self.search.as_deref().unwrap_or(self)
    }

    fn open_one(cfg: &StorageConfig) -> Result<Objects, ArchiveError> {
        match cfg {
            StorageConfig::Local { root } => {
                std::fs::create_dir_all(root).map_err(|e| {
                    ArchiveError::Config(format!("archive directory {}: {e}", root.display()))
                })?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(root)?;
                Ok(Objects {
                    store: Arc::new(store),
                    local_root: Some(root.clone()),
                    describe: format!("file://{}", root.display()),
                    search: None,
                })
            }
            StorageConfig::S3(s3) => {
                // reqwest is built without a default TLS provider (see Cargo.toml); ring is
                // the one the rest of the binary uses. Installing it twice is harmless.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let retry = object_store::RetryConfig {
                    retry_timeout: s3.retry_timeout,
                    max_retries: 10,
                    ..Default::default()
                };
                let options = object_store::ClientOptions::new()
                    .with_allow_http(s3.allow_http)
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(60));
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(&s3.bucket)
                    .with_region(&s3.region)
                    .with_retry(retry)
                    .with_client_options(options);
                if let Some((id, secret)) = &s3.credentials {
                    builder = builder
                        .with_access_key_id(id)
                        .with_secret_access_key(secret);
                }
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_virtual_hosted_style_request(false);
                }
                let store: Arc<dyn ObjectStore> = Arc::new(builder.build()?);
                let prefix = s3.prefix.trim_matches('/');
                let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                    store
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
                };
                Ok(Objects {
                    store,
                    local_root: None,
                    describe: format!("s3://{}/{}", s3.bucket, prefix),
                    search: None,
                })
            }
        }
    }

    /// Where the store is, for messages.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Writes an object whole. On the local store it is fsync'd (file and directory) before
    /// this returns, so an index that points at it never outlives it.
    pub async fn put(&self, path: &str, bytes: Bytes) -> Result<(), ArchiveError> {
        self.store
            .put(&Path::from(path), PutPayload::from(bytes))
            .await?;
        if let Some(root) = &self.local_root {
            let file = root.join(path);
            let synced = tokio::task::spawn_blocking(move || sync_file_and_dir(&file))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            synced.map_err(|e| {
                ArchiveError::ObjectStore(object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: Box::new(e),
                })
            })?;
        }
        Ok(())
    }

    pub async fn get(&self, path: &str) -> Result<Bytes, ArchiveError> {
        let got = self.store.get(&Path::from(path)).await;
        Ok(not_found_is_missing(path, got)?.bytes().await?)
    }

    pub async fn get_range(&self, path: &str, range: Range<u64>) -> Result<Bytes, ArchiveError> {
        not_found_is_missing(path, self.store.get_range(&Path::from(path), range).await)
    }

    /// The last `n` bytes of an object (all of it if shorter) and the object's size, in one
    /// request.
    pub async fn get_tail(&self, path: &str, n: u64) -> Result<(Bytes, u64), ArchiveError> {
        let opts =
            object_store::GetOptions::default().with_range(Some(object_store::GetRange::Suffix(n)));
        let got = not_found_is_missing(path, self.store.get_opts(&Path::from(path), opts).await)?;
        let size = got.meta.size;
        Ok((got.bytes().await?, size))
    }

    pub async fn delete(&self, path: &str) -> Result<(), ArchiveError> {
        match self.store.delete(&Path::from(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every object under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, ArchiveError> {
        let prefix = Path::from(prefix);
        let found: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        Ok(found
            .into_iter()
            .map(|m| Listed {
                path: m.location.to_string(),
                size: m.size,
                modified_ms: m.last_modified.timestamp_millis(),
            })
            .collect())
    }
}

fn not_found_is_missing<T>(path: &str, r: object_store::Result<T>) -> Result<T, ArchiveError> {
    match r {
        Err(object_store::Error::NotFound { .. }) => Err(ArchiveError::Missing {
            path: path.to_string(),
        }),
        other => Ok(other?),
    }
}

fn sync_file_and_dir(file: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(file)?.sync_all()?;
    if let Some(dir) = file.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `tenant=<t>/`: every segment of a tenant.
pub fn tenant_prefix(tenant: &str) -> String {
    format!("tenant={tenant}/")
}

/// `tenant=<t>/date=<yyyy-mm-dd>/<segment>.parquet`.
pub fn segment_path(tenant: &str, date: &str, segment: &str) -> String {
    format!("tenant={tenant}/date={date}/{segment}.parquet")
}

/// The segment id of a segment path, if it is one.
pub fn segment_id_of(path: &str) -> Option<&str> {
    let name = path.rsplit('/').next()?;
    name.strip_suffix(".parquet")
}

/// The path of a segment's search index in [`Objects::search_indexes`]: the segment's path
/// with `.search` for `.parquet` ([`crate::search_index`]).
pub fn search_index_path(segment_path: &str) -> Option<String> {
    let stem = segment_path.strip_suffix(".parquet")?;
    Some(format!("{stem}.search"))
}

/// The segment id of a search index's path, if it is one.
pub fn search_index_segment_id(path: &str) -> Option<&str> {
    let name = path.rsplit('/').next()?;
    name.strip_suffix(".search")
}

/// The UTC date (`yyyy-mm-dd`) of a time in ms since the epoch.
pub fn utc_date(ms: i64) -> String {
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let days = ms.div_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(86_400_000 - 1), "1970-01-01");
        assert_eq!(utc_date(951_782_400_000), "2000-02-29");
        assert_eq!(utc_date(1_795_996_800_000), "2026-11-30");
        assert_eq!(utc_date(-1), "1969-12-31");
    }

    #[test]
    fn segment_paths_are_hive_partitions() {
        let p = segment_path("acme", "2026-11-30", "0193");
        assert_eq!(p, "tenant=acme/date=2026-11-30/0193.parquet");
        assert_eq!(segment_id_of(&p), Some("0193"));
        assert_eq!(segment_id_of("tenant=acme/date=x/0193.parquet#1"), None);
        let index = search_index_path(&p).expect("a segment path");
        assert_eq!(index, "tenant=acme/date=2026-11-30/0193.search");
        assert_eq!(search_index_segment_id(&index), Some("0193"));
        assert_eq!(segment_id_of(&index), None);
        let sibling = StorageConfig::Local {
            root: PathBuf::from("data/archive"),
        }
        .search_sibling()
        .expect("sibling");
        assert_eq!(
            sibling,
            StorageConfig::Local {
                root: PathBuf::from("data/archive.search")
            }
        );
    }
}
