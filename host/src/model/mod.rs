//! A wanserve model directory: the manifest (`wanserve-model.json`) written by
//! `models/export.py`, checked against the files beside it before anything is loaded.

mod manifest;
mod stamp;

pub use manifest::{
    FewStepSpec, MagRatios, Manifest, PreviewSpec, TextEncoderSpec, TokenizerSpec, TransformerSpec,
    UniPcConfig, VaeSpec,
};
pub use stamp::Verify;

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
    /// Files hashed by this open (the others were unchanged since they last verified).
    pub hashed_files: usize,
}

impl ModelDir {
    /// Reads the manifest and verifies the files it lists: each is hashed unless it is unchanged
    /// since it last verified on this machine (see `stamp.rs`; hashing is size-proportional: tens
    /// of seconds for the real multi-GB model, milliseconds for the bundled one).
    pub fn open(root: &Path) -> Result<Self, ModelError> {
        Self::open_with(root, Verify::Changed)
    }

    /// [`ModelDir::open`], or with [`Verify::Full`] every file hashed whatever the stamp says.
    pub fn open_with(root: &Path, verify: Verify) -> Result<Self, ModelError> {
        Self::open_stamped(root, verify, stamp::default_dir().as_deref())
    }

    /// Stamps are read from and written to `stamp_dir` (none: every file is hashed).
    fn open_stamped(
        root: &Path,
        verify: Verify,
        stamp_dir: Option<&Path>,
    ) -> Result<Self, ModelError> {
        if !root.is_dir() {
            return Err(ModelError::MissingDir(root.to_path_buf()));
        }
        let path = root.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(file_error(&path))?;
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
        let known = match (verify, stamp_dir) {
            (Verify::Changed, Some(dir)) => stamp::Stamp::load(dir, root),
            _ => stamp::Stamp::default(),
        };
        let mut verified = stamp::Stamp::default();
        let mut hashed_files = 0;
        for (name, expected) in &manifest.files {
            let file = root.join(name);
            // Before hashing: a file changed while it hashes does not match its fingerprint
            // next time.
            let seen =
                stamp::Fingerprint::of(&std::fs::metadata(&file).map_err(file_error(&file))?);
            if !known.trusts(name, expected, &seen) {
                hashed_files += 1;
                let actual = sha256_file(&file)?;
                if !actual.eq_ignore_ascii_case(expected) {
                    return Err(ModelError::Checksum {
                        path: file,
                        expected: expected.clone(),
                        actual,
                    });
                }
            }
            verified.record(name, expected, seen);
        }
        if hashed_files > 0
            && let Some(dir) = stamp_dir
            && let Err(e) = verified.save(dir, root)
        {
            // Only costs the next start a full hash.
            tracing::warn!(dir = %dir.display(), error = %e, "cannot record the verified model files");
        }
        tracing::info!(
            model = %root.display(),
            hashed = hashed_files,
            unchanged = manifest.files.len() - hashed_files,
            "model files verified"
        );
        Ok(Self {
            root: root.to_path_buf(),
            manifest,
            hashed_files,
        })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

/// A model file that cannot be opened: missing, or another I/O error.
fn file_error(path: &Path) -> impl Fn(std::io::Error) -> ModelError + '_ {
    move |source| match source.kind() {
        std::io::ErrorKind::NotFound => ModelError::MissingFile(path.to_path_buf()),
        _ => ModelError::Io {
            path: path.to_path_buf(),
            source,
        },
    }
}

fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let mut file = std::fs::File::open(path).map_err(file_error(path))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A writable copy of the bundled model.
    fn model_copy() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        for entry in std::fs::read_dir(bundled_model_dir()).expect("bundled model") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
        }
        dir
    }

    #[test]
    fn files_hash_once_and_again_only_when_they_change() {
        let model = model_copy();
        let stamps = tempfile::tempdir().expect("temp dir");
        let open = |verify| ModelDir::open_stamped(model.path(), verify, Some(stamps.path()));
        let files = open(Verify::Changed).expect("opens").manifest.files.len();
        assert_eq!(open(Verify::Changed).expect("opens").hashed_files, 0);
        assert_eq!(open(Verify::Full).expect("opens").hashed_files, files);

        // Corrupt one byte, then put the size and modification time back: still caught.
        let path = model.path().join("tokenizer.json");
        let before = std::fs::metadata(&path).expect("metadata");
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[10] ^= 0x20;
        std::fs::write(&path, &bytes).expect("write");
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(before.modified()?))
            .expect("mtime put back");
        assert_eq!(
            std::fs::metadata(&path).expect("metadata").len(),
            before.len()
        );
        match open(Verify::Changed) {
            Err(ModelError::Checksum { path: bad, .. }) => assert_eq!(bad, path),
            other => panic!("a corrupted file passed: {other:?}"),
        }
    }

    #[test]
    fn without_a_stamp_directory_every_file_is_hashed() {
        let model = model_copy();
        let first = ModelDir::open_stamped(model.path(), Verify::Changed, None).expect("opens");
        let again = ModelDir::open_stamped(model.path(), Verify::Changed, None).expect("opens");
        assert_eq!(first.hashed_files, first.manifest.files.len());
        assert_eq!(again.hashed_files, again.manifest.files.len());
    }
}
