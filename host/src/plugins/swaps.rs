//! What each slot has served, kept in the data directory so that a swap survives a restart:
//! `<data-dir>/plugin-swaps/<slot>/<sha256>.wasm` for each component, and `history.json` with the
//! last [`KEEP`] installs (newest last) and which of them serves now.
//!
//! Every install is recorded: an upload through the admin API, a file changed in the plugin
//! directory, the file start-up installed. At start a slot loads the history's current entry
//! when it came from an upload or a rollback (its digest checked again); when it came from the
//! plugin directory, the file there loads, as before (it may have changed while the server
//! was down). A rollback makes an earlier entry current (the one that served before the
//! current one was installed, or a named digest) and records nothing new, so rolling back twice
//! goes two installs back, and an upload after a rollback rolls back to what it replaced.

use super::slot::Slot;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// How many installs per slot the history keeps (their components too).
pub const KEEP: usize = 8;

/// Where an install came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwapSource {
    /// `PUT /admin/plugins/{slot}`.
    Upload,
    /// The slot's file in the plugin directory (at start or changed while running).
    File,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SwapEntry {
    /// Increases with each install of the slot.
    pub id: u64,
    /// The entry that served when this one was installed: where a rollback from it goes.
    pub previous: Option<u64>,
    pub sha256: String,
    pub size: usize,
    /// Unix milliseconds.
    pub installed_at: i64,
    pub source: SwapSource,
}

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct SlotHistory {
    /// Oldest first.
    pub entries: Vec<SwapEntry>,
    /// Index into `entries` of the one serving (meaningless when `entries` is empty).
    pub current: usize,
}

impl SlotHistory {
    pub fn current(&self) -> Option<&SwapEntry> {
        self.entries.get(self.current)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a plugin history ({reason})")]
    Corrupt { path: PathBuf, reason: String },
    #[error("no earlier {0} plugin in its history to roll back to")]
    NothingEarlier(Slot),
    #[error("no {slot} plugin with SHA-256 {sha256} in its history")]
    UnknownDigest { slot: Slot, sha256: String },
    #[error("the stored {slot} plugin {sha256} is missing or does not match its digest")]
    Damaged { slot: Slot, sha256: String },
}

/// The per-slot histories under one data directory.
pub struct SwapStore {
    dir: PathBuf,
    /// One history write at a time (an upload racing a file change).
    writing: std::sync::Mutex<()>,
}

impl SwapStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("plugin-swaps"),
            writing: std::sync::Mutex::new(()),
        }
    }

    fn slot_dir(&self, slot: Slot) -> PathBuf {
        self.dir.join(slot.to_string())
    }

    fn history_file(&self, slot: Slot) -> PathBuf {
        self.slot_dir(slot).join("history.json")
    }

    fn component_file(&self, slot: Slot, sha256: &str) -> PathBuf {
        self.slot_dir(slot).join(format!("{sha256}.wasm"))
    }

    /// The slot's history (empty when nothing was ever recorded).
    pub fn history(&self, slot: Slot) -> Result<SlotHistory, SwapError> {
        let path = self.history_file(slot);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let history: SlotHistory =
                    serde_json::from_slice(&bytes).map_err(|e| SwapError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if !history.entries.is_empty() && history.current >= history.entries.len() {
                    return Err(SwapError::Corrupt {
                        path,
                        reason: "its current entry is past its end".into(),
                    });
                }
                Ok(history)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SlotHistory::default()),
            Err(source) => Err(SwapError::Io { path, source }),
        }
    }

    /// A stored component's bytes, checked against its digest.
    pub fn component(&self, slot: Slot, sha256: &str) -> Result<Vec<u8>, SwapError> {
        let damaged = || SwapError::Damaged {
            slot,
            sha256: sha256.to_string(),
        };
        let bytes = std::fs::read(self.component_file(slot, sha256)).map_err(|_| damaged())?;
        if hex::encode(Sha256::digest(&bytes)) == sha256 {
            Ok(bytes)
        } else {
            Err(damaged())
        }
    }

    /// What start-up should install instead of the plugin directory's file: the current entry
    /// when an upload put it there or a rollback went back to it (`None`: the newest install
    /// came from the file, and the file is what serves).
    pub fn stored_current(&self, slot: Slot) -> Result<Option<(SwapEntry, Vec<u8>)>, SwapError> {
        let history = self.history(slot)?;
        let rolled_back = history.current + 1 < history.entries.len();
        match history.current() {
            Some(entry) if entry.source == SwapSource::Upload || rolled_back => {
                let bytes = self.component(slot, &entry.sha256)?;
                Ok(Some((entry.clone(), bytes)))
            }
            _ => Ok(None),
        }
    }

    /// Records an install that now serves: the component is stored (once per digest) and
    /// becomes the history's newest, current entry; past [`KEEP`], the oldest go, with their
    /// files. A file install whose digest is already the current entry records nothing.
    pub fn record(
        &self,
        slot: Slot,
        bytes: &[u8],
        source: SwapSource,
        now_ms: i64,
    ) -> Result<SwapEntry, SwapError> {
        let _writing = crate::sync::lock(&self.writing);
        let sha256 = hex::encode(Sha256::digest(bytes));
        let mut history = self.history(slot)?;
        if let Some(current) = history.current()
            && current.sha256 == sha256
            && source == SwapSource::File
            && current.source == SwapSource::File
        {
            return Ok(current.clone());
        }
        let dir = self.slot_dir(slot);
        std::fs::create_dir_all(&dir).map_err(|source| SwapError::Io {
            path: dir.clone(),
            source,
        })?;
        let file = self.component_file(slot, &sha256);
        if !file.exists() {
            write_atomically(&file, bytes)?;
        }
        let entry = SwapEntry {
            id: history.entries.last().map_or(0, |e| e.id + 1),
            previous: history.current().map(|e| e.id),
            sha256,
            size: bytes.len(),
            installed_at: now_ms,
            source,
        };
        history.entries.push(entry.clone());
        let excess = history.entries.len().saturating_sub(KEEP);
        let dropped: Vec<SwapEntry> = history.entries.drain(..excess).collect();
        history.current = history.entries.len() - 1;
        self.write_history(slot, &history)?;
        for old in dropped {
            if !history.entries.iter().any(|e| e.sha256 == old.sha256) {
                let _ = std::fs::remove_file(self.component_file(slot, &old.sha256));
            }
        }
        Ok(entry)
    }

    /// The entry a rollback would install: the one that served before the current one was
    /// installed (gone once it falls out of the history), or the newest with `sha256`, with its
    /// bytes. Nothing changes until [`SwapStore::rolled_back_to`].
    pub fn rollback_target(
        &self,
        slot: Slot,
        sha256: Option<&str>,
    ) -> Result<(usize, SwapEntry, Vec<u8>), SwapError> {
        let history = self.history(slot)?;
        let index = match sha256 {
            Some(wanted) => history
                .entries
                .iter()
                .rposition(|e| e.sha256 == wanted)
                .ok_or_else(|| SwapError::UnknownDigest {
                    slot,
                    sha256: wanted.to_string(),
                })?,
            None => history
                .current()
                .and_then(|current| current.previous)
                .and_then(|previous| history.entries.iter().position(|e| e.id == previous))
                .ok_or(SwapError::NothingEarlier(slot))?,
        };
        let entry = history.entries[index].clone();
        let bytes = self.component(slot, &entry.sha256)?;
        Ok((index, entry, bytes))
    }

    /// Marks entry `index` as the one serving (after it was installed).
    pub fn rolled_back_to(&self, slot: Slot, index: usize) -> Result<(), SwapError> {
        let _writing = crate::sync::lock(&self.writing);
        let mut history = self.history(slot)?;
        if index < history.entries.len() {
            history.current = index;
            self.write_history(slot, &history)?;
        }
        Ok(())
    }

    fn write_history(&self, slot: Slot, history: &SlotHistory) -> Result<(), SwapError> {
        let path = self.history_file(slot);
        let text = serde_json::to_vec_pretty(history).map_err(|e| SwapError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomically(&path, &text)
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`, so a
/// crash leaves the old file or the new one, never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SwapError> {
    use std::io::Write;
    let io = |source| SwapError::Io {
        path: path.to_path_buf(),
        source,
    };
    let temporary = path.with_extension("partial");
    let mut file = std::fs::File::create(&temporary).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temporary, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_last_installs_and_rollback_walks_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SwapStore::new(dir.path());
        assert!(
            store
                .stored_current(Slot::Validate)
                .expect("empty")
                .is_none()
        );
        store
            .record(Slot::Validate, b"file", SwapSource::File, 1)
            .expect("file");
        // The same file again (a restart) is not a new install.
        store
            .record(Slot::Validate, b"file", SwapSource::File, 2)
            .expect("file again");
        let a = store
            .record(Slot::Validate, b"upload a", SwapSource::Upload, 3)
            .expect("a");
        let b = store
            .record(Slot::Validate, b"upload b", SwapSource::Upload, 4)
            .expect("b");
        assert_eq!(store.history(Slot::Validate).expect("h").entries.len(), 3);
        let (current, bytes) = store
            .stored_current(Slot::Validate)
            .expect("read")
            .expect("an upload serves");
        assert_eq!(
            (current.sha256.as_str(), bytes.as_slice()),
            (b.sha256.as_str(), &b"upload b"[..])
        );

        // Two rollbacks go two installs back, not back and forth.
        let (index, entry, _) = store
            .rollback_target(Slot::Validate, None)
            .expect("one back");
        assert_eq!(entry.sha256, a.sha256);
        store.rolled_back_to(Slot::Validate, index).expect("mark");
        let (index, entry, bytes) = store
            .rollback_target(Slot::Validate, None)
            .expect("two back");
        assert_eq!(bytes, b"file");
        store.rolled_back_to(Slot::Validate, index).expect("mark");
        assert!(matches!(
            store.rollback_target(Slot::Validate, None),
            Err(SwapError::NothingEarlier(Slot::Validate))
        ));
        // Rolled back to the file's component: a restart loads that stored copy.
        assert_eq!(
            store
                .stored_current(Slot::Validate)
                .expect("read")
                .map(|(e, _)| e.sha256),
            Some(entry.sha256)
        );
        // By digest, forwards too.
        let (index, entry, _) = store
            .rollback_target(Slot::Validate, Some(&b.sha256))
            .expect("by digest");
        assert_eq!(entry, b);
        store.rolled_back_to(Slot::Validate, index).expect("mark");
        // An upload after a rollback rolls back to what it replaced, not to what was undone.
        store
            .rolled_back_to(Slot::Validate, 0)
            .expect("back to the file");
        store
            .record(Slot::Validate, b"upload c", SwapSource::Upload, 5)
            .expect("c");
        let (_, _, bytes) = store.rollback_target(Slot::Validate, None).expect("from c");
        assert_eq!(bytes, b"file");
        assert!(matches!(
            store.rollback_target(Slot::Validate, Some("00")),
            Err(SwapError::UnknownDigest { .. })
        ));
    }

    #[test]
    fn past_the_limit_the_oldest_go_with_their_files_and_damage_is_caught() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SwapStore::new(dir.path());
        let first = store
            .record(Slot::Auth, b"v0", SwapSource::Upload, 0)
            .expect("v0");
        for i in 1..=KEEP {
            store
                .record(
                    Slot::Auth,
                    format!("v{i}").as_bytes(),
                    SwapSource::Upload,
                    i as i64,
                )
                .expect("record");
        }
        let history = store.history(Slot::Auth).expect("h");
        assert_eq!(history.entries.len(), KEEP);
        assert!(history.entries.iter().all(|e| e.sha256 != first.sha256));
        assert!(!store.component_file(Slot::Auth, &first.sha256).exists());
        // A stored component whose bytes changed is refused, not loaded.
        let current = history.current().expect("current").clone();
        std::fs::write(
            store.component_file(Slot::Auth, &current.sha256),
            b"tampered",
        )
        .expect("write");
        assert!(matches!(
            store.stored_current(Slot::Auth),
            Err(SwapError::Damaged { .. })
        ));
    }
}
