//! Where finished videos live and how clients reach them: an `object_store` (local disk by
//! default, S3-compatible by URL) and URLs that open without an API key.
//!
//! - Local disk: `/videos/<key>?expires=<unix s>&sig=<hex>`, served by this server; `sig` is
//!   HMAC-SHA256 over the key and expiry with a secret kept in the data directory.
//! - S3: a presigned GET URL from the store's own signer (SigV4).
//!
//! Either way a URL is never valid past the video's expiry. A video is published with one
//! atomic put (a local upload stages and renames; S3 completes a multipart upload at once), so
//! no reader ever sees half a video under its key.

use hmac::{Hmac, Mac};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{ObjectStore, ObjectStoreExt};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::Sha256;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("--store / WANSERVE_STORE {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("object key {0:?} is not a safe relative path")]
    BadKey(String),
}

/// Why a `/videos/...` request is refused (all answered 403, without saying which).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlRefusal {
    BadSignature,
    Expired,
    BadKey,
}

enum Backend {
    Local { root: PathBuf },
    S3 { signer: Arc<AmazonS3> },
}

pub struct VideoStore {
    objects: Arc<dyn ObjectStore>,
    backend: Backend,
    /// Prefix inside the bucket (S3) under which keys live.
    prefix: Option<ObjectPath>,
    url_secret: SecretSlice<u8>,
    /// Base of local video URLs, e.g. `http://localhost:8088` (no trailing slash).
    public_url: String,
    description: String,
}

/// The file holding the URL-signing secret, in the data directory.
pub const URL_SECRET_FILE: &str = "url-secret";

/// S3 presigned URLs cannot be valid longer than this (SigV4's limit).
const MAX_PRESIGN: Duration = Duration::from_secs(7 * 24 * 3600);

impl VideoStore {
    /// `store`: `None` for `<data_dir>/videos`, `file:///abs/dir`, or `s3://bucket[/prefix]`
    /// (credentials, region and endpoint from the standard `AWS_*` variables).
    /// `retry`: how long a failing S3 request is retried before it is an error.
    /// `public_url`: the base of the URLs a local store hands out (the server's address).
    pub fn open(
        store: Option<&str>,
        data_dir: &Path,
        public_url: &str,
        retry: Duration,
    ) -> Result<Self, StorageError> {
        Ok(Self::open_unlisted(store, data_dir, retry)?.served_at(public_url))
    }

    /// [`VideoStore::open`] before the server knows its address (start-up checks the URL
    /// before the model loads, and binds the listener later): [`VideoStore::served_at`] sets it.
    pub fn open_unlisted(
        store: Option<&str>,
        data_dir: &Path,
        retry: Duration,
    ) -> Result<Self, StorageError> {
        let url_secret = load_or_create_secret(&data_dir.join(URL_SECRET_FILE))?;
        let public_url = String::new();
        let url_error = |url: &str, reason: String| StorageError::Url {
            url: url.into(),
            reason,
        };
        let (objects, backend, prefix, description): (Arc<dyn ObjectStore>, _, _, _) = match store {
            None => {
                let root = data_dir.join("videos");
                let local = local_store(&root)?;
                let description = format!("local disk {}", root.display());
                (local, Backend::Local { root }, None, description)
            }
            Some(url) if url.starts_with("file://") => {
                let parsed = url::Url::parse(url).map_err(|e| url_error(url, e.to_string()))?;
                let root = parsed
                    .to_file_path()
                    .map_err(|()| url_error(url, "not an absolute file path".into()))?;
                let local = local_store(&root)?;
                let description = format!("local disk {}", root.display());
                (local, Backend::Local { root }, None, description)
            }
            Some(url) if url.starts_with("s3://") => {
                let parsed = url::Url::parse(url).map_err(|e| url_error(url, e.to_string()))?;
                let prefix = parsed.path().trim_matches('/');
                let prefix = if prefix.is_empty() {
                    None
                } else {
                    Some(ObjectPath::parse(prefix).map_err(|e| url_error(url, e.to_string()))?)
                };
                let s3 = Arc::new(
                    AmazonS3Builder::from_env()
                        .with_url(url)
                        .with_retry(object_store::RetryConfig {
                            retry_timeout: retry,
                            ..Default::default()
                        })
                        .build()
                        .map_err(|e| url_error(url, e.to_string()))?,
                );
                let description = format!("S3 {url}");
                (
                    s3.clone() as Arc<dyn ObjectStore>,
                    Backend::S3 { signer: s3 },
                    prefix,
                    description,
                )
            }
            Some(url) => {
                return Err(url_error(
                    url,
                    "use file:///absolute/dir or s3://bucket[/prefix]".into(),
                ));
            }
        };
        Ok(Self {
            objects,
            backend,
            prefix,
            url_secret,
            public_url,
            description,
        })
    }

    /// The base of the URLs a local store hands out.
    pub fn served_at(mut self, public_url: &str) -> Self {
        self.public_url = public_url.trim_end_matches('/').to_string();
        self
    }

    /// What the store is, for the start-up log (no credentials).
    pub fn describe(&self) -> &str {
        &self.description
    }

    pub fn is_local(&self) -> bool {
        matches!(self.backend, Backend::Local { .. })
    }

    fn path(&self, key: &str) -> Result<ObjectPath, StorageError> {
        if !is_safe_key(key) {
            return Err(StorageError::BadKey(key.into()));
        }
        let path = ObjectPath::parse(key).map_err(|_| StorageError::BadKey(key.into()))?;
        Ok(match &self.prefix {
            Some(prefix) => prefix.parts().chain(path.parts()).collect(),
            None => path,
        })
    }

    /// Uploads the finished file at `file` as `key`, in one atomic publish.
    pub async fn publish(&self, file: &Path, key: &str) -> Result<u64, StorageError> {
        let path = self.path(key)?;
        let io_error = |e: std::io::Error| StorageError::Io {
            path: file.to_path_buf(),
            reason: e.to_string(),
        };
        let mut source = tokio::fs::File::open(file).await.map_err(io_error)?;
        let mut writer = BufWriter::new(self.objects.clone(), path);
        let copied = tokio::io::copy(&mut source, &mut writer)
            .await
            .map_err(io_error);
        match copied {
            Ok(bytes) => {
                // Completes the put (or the multipart upload): the object appears now, whole.
                writer.shutdown().await.map_err(io_error)?;
                Ok(bytes)
            }
            Err(e) => {
                // Aborts a multipart upload so no part is left behind.
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match self.objects.delete(&self.path(key)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        match self.objects.head(&self.path(key)?).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The readiness probe's object: one name for every host, so that one a crash left between
    /// write and delete is overwritten and deleted by the next probe of any host.
    pub const PROBE_KEY: &'static str = ".wanserve-ready-probe";

    /// Writes and deletes [`Self::PROBE_KEY`]: what `/ready` reports. Another host may have
    /// deleted it first (a fleet's hosts probe the same object): that is not a failure.
    pub async fn probe_writable(&self) -> Result<(), StorageError> {
        let path = self.path(Self::PROBE_KEY)?;
        self.objects.put(&path, "ok".into()).await?;
        match self.objects.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A URL for `key` valid until `expires_at_ms` (and never longer); `None` once that has
    /// passed.
    pub async fn url(
        &self,
        key: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<Option<String>, StorageError> {
        if expires_at_ms <= now_ms {
            return Ok(None);
        }
        match &self.backend {
            Backend::Local { .. } => {
                if !is_safe_key(key) {
                    return Err(StorageError::BadKey(key.into()));
                }
                // Whole seconds, rounded down: the URL dies no later than the video.
                let expires = expires_at_ms.div_euclid(1000);
                let sig = self.local_signature(key, expires);
                Ok(Some(format!(
                    "{}/videos/{}?expires={expires}&sig={sig}",
                    self.public_url,
                    encode_key(key)
                )))
            }
            Backend::S3 { signer } => {
                let ttl = Duration::from_millis((expires_at_ms - now_ms) as u64).min(MAX_PRESIGN);
                let ttl = Duration::from_secs(ttl.as_secs());
                if ttl.is_zero() {
                    return Ok(None);
                }
                let url = signer
                    .signed_url(http::Method::GET, &self.path(key)?, ttl)
                    .await?;
                Ok(Some(url.to_string()))
            }
        }
    }

    /// HMAC-SHA256 over the method, key and expiry of a local video URL.
    fn url_mac(&self, key: &str, expires: i64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.url_secret.expose_secret())
            .expect("HMAC takes keys of any length");
        mac.update(b"GET\n");
        mac.update(key.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    fn local_signature(&self, key: &str, expires: i64) -> String {
        hex::encode(self.url_mac(key, expires).finalize().into_bytes())
    }

    /// Checks a local video URL's signature and expiry; returns the file to serve.
    pub fn verify_local(
        &self,
        key: &str,
        expires: &str,
        sig: &str,
        now_ms: i64,
    ) -> Result<PathBuf, UrlRefusal> {
        let Backend::Local { root } = &self.backend else {
            return Err(UrlRefusal::BadKey);
        };
        if !is_safe_key(key) {
            return Err(UrlRefusal::BadKey);
        }
        let expires_s: i64 = expires.parse().map_err(|_| UrlRefusal::BadSignature)?;
        let given = hex::decode(sig).map_err(|_| UrlRefusal::BadSignature)?;
        // verify_slice compares in constant time.
        self.url_mac(key, expires_s)
            .verify_slice(&given)
            .map_err(|_| UrlRefusal::BadSignature)?;
        if expires_s.saturating_mul(1000) <= now_ms {
            return Err(UrlRefusal::Expired);
        }
        Ok(key.split('/').fold(root.clone(), |p, seg| p.join(seg)))
    }

    /// Every object under `dir/` (keys relative to the store), for recovery and tests.
    pub async fn list(&self, dir: Option<&str>) -> Result<Vec<String>, StorageError> {
        use futures::TryStreamExt;
        let prefix = match dir {
            Some(d) => Some(self.path(d)?),
            None => self.prefix.clone(),
        };
        let strip = self.prefix.as_ref().map(|p| p.parts().count()).unwrap_or(0);
        let metas: Vec<_> = self.objects.list(prefix.as_ref()).try_collect().await?;
        Ok(metas
            .into_iter()
            .map(|m| {
                m.location
                    .parts()
                    .skip(strip)
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .collect())
    }
}

fn local_store(root: &Path) -> Result<Arc<dyn ObjectStore>, StorageError> {
    std::fs::create_dir_all(root).map_err(|e| StorageError::Io {
        path: root.to_path_buf(),
        reason: e.to_string(),
    })?;
    let store = LocalFileSystem::new_with_prefix(root)?.with_automatic_cleanup(true);
    Ok(Arc::new(store))
}

/// Keys are relative paths of `[A-Za-z0-9._-]` segments, none empty, `.` or `..`, at most 512
/// bytes: nothing a key names can be outside the store, and keys need no escaping in URLs. The
/// plugin host applies the same rule to a post-process plugin's answer.
pub fn is_safe_key(key: &str) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/');
    !key.is_empty()
        && key.len() <= 512
        && key.chars().all(allowed)
        && !key
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
}

/// Keys contain only URL-safe characters (see [`is_safe_key`]); kept as a function so the URL
/// shape has one definition.
fn encode_key(key: &str) -> &str {
    key
}

/// Reads the signing secret, or creates 32 random bytes (mode 0600, written then renamed).
pub(crate) fn load_or_create_secret(path: &Path) -> Result<SecretSlice<u8>, StorageError> {
    let io_error = |e: std::io::Error| StorageError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    match std::fs::read(path) {
        Ok(bytes) if bytes.len() >= 32 => return Ok(bytes.into()),
        Ok(_) => {
            return Err(StorageError::Io {
                path: path.to_path_buf(),
                reason: "the URL-signing secret is shorter than 32 bytes".into(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(e)),
    }
    let mut secret = vec![0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| StorageError::Io {
        path: path.to_path_buf(),
        reason: format!("no randomness: {e}"),
    })?;
    crate::private_file::write_private_file(path, &secret).map_err(io_error)?;
    Ok(secret.into())
}
