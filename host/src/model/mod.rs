//! A wanserve model directory: the manifest (`wanserve-model.json`) written by
//! `models/export.py`, checked against the files beside it before anything is loaded.

mod manifest;

pub use manifest::{
    Manifest, SchedulerConfig, TextEncoderSpec, TokenizerSpec, TransformerSpec, VaeSpec,
};

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "wanserve-model.json";

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model directory {0} does not exist")]
    MissingDir(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid wanserve manifest: {source}")]
    BadManifest {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: unsupported manifest ({reason})")]
    Unsupported { path: PathBuf, reason: String },
    #[error("model file {0} is missing")]
    MissingFile(PathBuf),
    #[error(
        "model file {path} is corrupt: SHA-256 {actual} does not match the manifest's {expected}"
    )]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

/// A model directory whose manifest parsed and whose files all match their SHA-256.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub root: PathBuf,
    pub manifest: Manifest,
}

impl ModelDir {
    /// Reads the manifest and verifies every file it lists (size-proportional: a few seconds for
    /// the real multi-GB model, milliseconds for the bundled one).
    pub fn open(root: &Path) -> Result<Self, ModelError> {
        if !root.is_dir() {
            return Err(ModelError::MissingDir(root.to_path_buf()));
        }
        let path = root.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ModelError::MissingFile(path.clone()),
            _ => ModelError::Io {
                path: path.clone(),
                source,
            },
        })?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|source| ModelError::BadManifest {
                path: path.clone(),
                source,
            })?;
        manifest
            .validate()
            .map_err(|reason| ModelError::Unsupported {
                path: path.clone(),
                reason,
            })?;
        for name in manifest.referenced_files() {
            if !manifest.files.contains_key(name) {
                return Err(ModelError::Unsupported {
                    path: path.clone(),
                    reason: format!("{name} is used but has no checksum"),
                });
            }
        }
        for (name, expected) in &manifest.files {
            let file = root.join(name);
            let actual = sha256_file(&file)?;
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(ModelError::Checksum {
                    path: file,
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            manifest,
        })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let mut file = std::fs::File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ModelError::MissingFile(path.to_path_buf()),
        _ => ModelError::Io {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The tiny random-weight model committed in `models/tiny/`, the default when no directory is given.
pub fn bundled_model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("models")
        .join("tiny")
}
