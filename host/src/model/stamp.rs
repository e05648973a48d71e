//! Remembers which model files have been verified, so that a multi-GB model is hashed once per
//! machine rather than at every start. A file is trusted without hashing only if its size,
//! modification and change times, inode and device are what they were when it last hashed to
//! the manifest's checksum: replacing or rewriting it (even with its old size and mtime put
//! back, which cannot restore the change time) makes it hash again. `Verify::Full` ignores the
//! stamp.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How much of a model directory to hash when it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// Files unchanged since they last verified are trusted; the rest are hashed.
    #[default]
    Changed,
    /// Every file is hashed.
    Full,
}

/// What a file looked like when it was hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    inode: u64,
    device: u64,
}

impl Fingerprint {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            inode: meta.ino(),
            device: meta.dev(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stamp {
    /// File name → (its verified SHA-256, its fingerprint then).
    files: BTreeMap<String, (String, Fingerprint)>,
}

impl Stamp {
    /// The stamp of the model at `root` under `dir`, or an empty one (missing, unreadable or
    /// malformed: all mean "hash everything").
    pub fn load(dir: &Path, root: &Path) -> Self {
        std::fs::read(stamp_path(dir, root))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Whether `name` verified to `sha256` when it looked like `now`.
    pub fn trusts(&self, name: &str, sha256: &str, now: &Fingerprint) -> bool {
        self.files
            .get(name)
            .is_some_and(|(hash, seen)| hash.eq_ignore_ascii_case(sha256) && seen == now)
    }

    pub fn record(&mut self, name: &str, sha256: &str, seen: Fingerprint) {
        self.files
            .insert(name.to_string(), (sha256.to_ascii_lowercase(), seen));
    }

    /// Writes the stamp (temp file + rename, so a reader never sees half of it).
    pub fn save(&self, dir: &Path, root: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let path = stamp_path(dir, root);
        let temp = path.with_extension("json.partial");
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&temp, bytes)?;
        std::fs::rename(&temp, &path)
    }
}

/// One stamp per model directory (by its canonical path).
fn stamp_path(dir: &Path, root: &Path) -> PathBuf {
    let canonical = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    dir.join(format!("{}.json", hex::encode(&digest[..16])))
}

/// Where stamps live on this machine.
pub fn default_dir() -> Option<PathBuf> {
    crate::home::wanserve_home().map(|home| home.join("verified-models"))
}
