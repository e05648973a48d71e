//! What each slot has served, kept so that a swap survives a restart and, in a fleet, reaches
//! every host: per slot, a history of the last [`KEEP`] installs (newest last) and which of them
//! serves now, beside the component of each. Where it lives is a [`SwapBackend`]: the data
//! directory on one host ([`LocalSwaps`]: `<data-dir>/plugin-swaps/<slot>/history.json` and
//! `<sha256>.wasm`), the queue's database in a fleet (`jobs::swap_history`), so that every host
//! reads and writes the same history.
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

    /// The entry that serves in place of the plugin directory's file: the current one when an
    /// upload put it there or a rollback went back to it.
    pub fn stored_current(&self) -> Option<&SwapEntry> {
        let rolled_back = self.current + 1 < self.entries.len();
        self.current()
            .filter(|entry| entry.source == SwapSource::Upload || rolled_back)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The fleet's shared history (its database) failed.
    #[error("the shared plugin history: {0}")]
    Shared(String),
    #[error("{place}: not a plugin history ({reason})")]
    Corrupt { place: String, reason: String },
    #[error("no earlier {0} plugin in its history to roll back to")]
    NothingEarlier(Slot),
    #[error("no {slot} plugin with SHA-256 {sha256} in its history")]
    UnknownDigest { slot: Slot, sha256: String },
    #[error("the stored {slot} plugin {sha256} is missing or does not match its digest")]
    Damaged { slot: Slot, sha256: String },
    #[error("the {slot} plugin {sha256} left its history before it could serve")]
    Gone { slot: Slot, sha256: String },
}

/// One change to a slot's history: the new history document, the component it adds (digest,
/// bytes; stored unless it is already) and the components no entry names any more.
pub struct Rewrite {
    pub history: Vec<u8>,
    pub add: Option<(String, Vec<u8>)>,
    pub remove: Vec<String>,
}

/// The change [`SwapBackend::rewrite`] applies: given the history document as it is (`None`:
/// never written), what to write (`None`: nothing).
pub type Change<'a> = dyn FnMut(Option<&[u8]>) -> Result<Option<Rewrite>, SwapError> + Send + 'a;

/// Where the histories and their components are kept.
#[async_trait::async_trait]
pub trait SwapBackend: Send + Sync {
    /// Where `slot`'s history is, for errors and the log.
    fn place(&self, slot: Slot) -> String;
    /// `slot`'s history document (`None`: never written).
    async fn read(&self, slot: Slot) -> Result<Option<Vec<u8>>, SwapError>;
    /// A stored component (`None`: not there).
    async fn component(&self, slot: Slot, sha256: &str) -> Result<Option<Vec<u8>>, SwapError>;
    /// Reads `slot`'s history with every other writer held off (on every host that shares it)
    /// until what `change` makes of it is written, components first.
    async fn rewrite(&self, slot: Slot, change: &mut Change<'_>) -> Result<(), SwapError>;
    /// Tells of changes other hosts make (a fleet's shared history): each names its slot.
    /// `None`: nothing else writes this history.
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Slot>> {
        None
    }
}

/// The per-slot histories, wherever their backend keeps them.
pub struct SwapStore {
    backend: std::sync::Arc<dyn SwapBackend>,
    /// Held while this host installs what the history names (an admin action, the fleet
    /// follower), so neither sees the other half done.
    installing: tokio::sync::Mutex<()>,
}

impl SwapStore {
    pub fn new(backend: std::sync::Arc<dyn SwapBackend>) -> Self {
        Self {
            backend,
            installing: tokio::sync::Mutex::new(()),
        }
    }

    /// The histories in `data_dir` (one host's).
    pub fn local(data_dir: &Path) -> Self {
        Self::new(std::sync::Arc::new(LocalSwaps::new(data_dir)))
    }

    /// Where the histories are, for the start-up log.
    pub fn place(&self) -> String {
        self.backend.place(Slot::Validate)
    }

    pub fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Slot>> {
        self.backend.changes()
    }

    /// Held while installing what the history names.
    pub async fn installing(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.installing.lock().await
    }

    /// The slot's history (empty when nothing was ever recorded).
    pub async fn history(&self, slot: Slot) -> Result<SlotHistory, SwapError> {
        let document = self.backend.read(slot).await?;
        parse_history(&self.backend.place(slot), document.as_deref())
    }

    /// A stored component's bytes, checked against its digest.
    pub async fn component(&self, slot: Slot, sha256: &str) -> Result<Vec<u8>, SwapError> {
        let damaged = || SwapError::Damaged {
            slot,
            sha256: sha256.to_string(),
        };
        let bytes = self
            .backend
            .component(slot, sha256)
            .await?
            .ok_or_else(damaged)?;
        if hex::encode(Sha256::digest(&bytes)) == sha256 {
            Ok(bytes)
        } else {
            Err(damaged())
        }
    }

    /// What should serve instead of the plugin directory's file (see
    /// [`SlotHistory::stored_current`]), with its bytes; `None`: the file serves.
    pub async fn stored_current(
        &self,
        slot: Slot,
    ) -> Result<Option<(SwapEntry, Vec<u8>)>, SwapError> {
        let history = self.history(slot).await?;
        match history.stored_current() {
            Some(entry) => {
                let bytes = self.component(slot, &entry.sha256).await?;
                Ok(Some((entry.clone(), bytes)))
            }
            None => Ok(None),
        }
    }

    /// Records an install: the component is stored (once per digest) and becomes the
    /// history's newest, current entry; past [`KEEP`], the oldest go, with their components. A
    /// file install whose digest is already the current entry records nothing.
    pub async fn record(
        &self,
        slot: Slot,
        bytes: &[u8],
        source: SwapSource,
        now_ms: i64,
    ) -> Result<SwapEntry, SwapError> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let place = self.backend.place(slot);
        let mut recorded = None;
        self.backend
            .rewrite(slot, &mut |document| {
                let mut history = parse_history(&place, document)?;
                if let Some(current) = history.current()
                    && current.sha256 == sha256
                    && source == SwapSource::File
                    && current.source == SwapSource::File
                {
                    recorded = Some(current.clone());
                    return Ok(None);
                }
                let entry = SwapEntry {
                    id: history.entries.last().map_or(0, |e| e.id + 1),
                    previous: history.current().map(|e| e.id),
                    sha256: sha256.clone(),
                    size: bytes.len(),
                    installed_at: now_ms,
                    source,
                };
                history.entries.push(entry.clone());
                let excess = history.entries.len().saturating_sub(KEEP);
                let dropped: Vec<SwapEntry> = history.entries.drain(..excess).collect();
                history.current = history.entries.len() - 1;
                let mut remove: Vec<String> = dropped
                    .into_iter()
                    .map(|old| old.sha256)
                    .filter(|old| !history.entries.iter().any(|e| &e.sha256 == old))
                    .collect();
                remove.sort_unstable();
                remove.dedup();
                recorded = Some(entry);
                Ok(Some(Rewrite {
                    history: write_history(&place, &history)?,
                    add: Some((sha256.clone(), bytes.to_vec())),
                    remove,
                }))
            })
            .await?;
        recorded.ok_or_else(|| SwapError::Gone {
            slot,
            sha256: sha256.clone(),
        })
    }

    /// The entry a rollback would install: the one that served before the current one was
    /// installed (gone once it falls out of the history), or the newest with `sha256`, with its
    /// bytes. Nothing changes until [`SwapStore::rolled_back_to`].
    pub async fn rollback_target(
        &self,
        slot: Slot,
        sha256: Option<&str>,
    ) -> Result<(SwapEntry, Vec<u8>), SwapError> {
        let history = self.history(slot).await?;
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
        let bytes = self.component(slot, &entry.sha256).await?;
        Ok((entry, bytes))
    }

    /// Makes `entry` the one serving (a rollback installed it). `Gone` when it left the
    /// history meanwhile (another host recorded past it).
    pub async fn rolled_back_to(&self, slot: Slot, entry: &SwapEntry) -> Result<(), SwapError> {
        let place = self.backend.place(slot);
        let mut found = false;
        self.backend
            .rewrite(slot, &mut |document| {
                let mut history = parse_history(&place, document)?;
                let Some(index) = history.entries.iter().position(|e| e.id == entry.id) else {
                    return Ok(None);
                };
                found = true;
                history.current = index;
                Ok(Some(Rewrite {
                    history: write_history(&place, &history)?,
                    add: None,
                    remove: Vec::new(),
                }))
            })
            .await?;
        if found {
            Ok(())
        } else {
            Err(SwapError::Gone {
                slot,
                sha256: entry.sha256.clone(),
            })
        }
    }
}

fn parse_history(place: &str, document: Option<&[u8]>) -> Result<SlotHistory, SwapError> {
    let Some(bytes) = document else {
        return Ok(SlotHistory::default());
    };
    let corrupt = |reason: String| SwapError::Corrupt {
        place: place.to_string(),
        reason,
    };
    let history: SlotHistory = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if !history.entries.is_empty() && history.current >= history.entries.len() {
        return Err(corrupt("its current entry is past its end".into()));
    }
    Ok(history)
}

fn write_history(place: &str, history: &SlotHistory) -> Result<Vec<u8>, SwapError> {
    serde_json::to_vec_pretty(history).map_err(|e| SwapError::Corrupt {
        place: place.to_string(),
        reason: e.to_string(),
    })
}

/// The histories of one host, in its data directory.
pub struct LocalSwaps {
    dir: PathBuf,
    /// One history write at a time (an upload racing a file change).
    writing: tokio::sync::Mutex<()>,
}

impl LocalSwaps {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("plugin-swaps"),
            writing: tokio::sync::Mutex::new(()),
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
}

/// The file's bytes, `None` when it does not exist.
async fn read_if_there(path: &Path) -> Result<Option<Vec<u8>>, SwapError> {
    match tokio::fs::read(path).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SwapError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[async_trait::async_trait]
impl SwapBackend for LocalSwaps {
    fn place(&self, slot: Slot) -> String {
        self.history_file(slot).display().to_string()
    }

    async fn read(&self, slot: Slot) -> Result<Option<Vec<u8>>, SwapError> {
        read_if_there(&self.history_file(slot)).await
    }

    async fn component(&self, slot: Slot, sha256: &str) -> Result<Option<Vec<u8>>, SwapError> {
        read_if_there(&self.component_file(slot, sha256)).await
    }

    async fn rewrite(&self, slot: Slot, change: &mut Change<'_>) -> Result<(), SwapError> {
        let _writing = self.writing.lock().await;
        let document = self.read(slot).await?;
        let Some(rewrite) = change(document.as_deref())? else {
            return Ok(());
        };
        let dir = self.slot_dir(slot);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|source| SwapError::Io {
                path: dir.clone(),
                source,
            })?;
        if let Some((sha256, bytes)) = &rewrite.add {
            let file = self.component_file(slot, sha256);
            if !tokio::fs::try_exists(&file).await.unwrap_or(false) {
                write_atomically(&file, bytes).await?;
            }
        }
        write_atomically(&self.history_file(slot), &rewrite.history).await?;
        for old in rewrite.remove {
            let _ = tokio::fs::remove_file(self.component_file(slot, &old)).await;
        }
        Ok(())
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`, so a
/// crash leaves the old file or the new one, never half of one.
async fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SwapError> {
    use tokio::io::AsyncWriteExt;
    let io = |source| SwapError::Io {
        path: path.to_path_buf(),
        source,
    };
    let temporary = path.with_extension("partial");
    let mut file = tokio::fs::File::create(&temporary).await.map_err(io)?;
    file.write_all(bytes).await.map_err(io)?;
    file.sync_all().await.map_err(io)?;
    tokio::fs::rename(&temporary, path).await.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn history_keeps_the_last_installs_and_rollback_walks_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SwapStore::local(dir.path());
        let record = |bytes: &'static [u8], source, at| {
            let store = &store;
            async move {
                store
                    .record(Slot::Validate, bytes, source, at)
                    .await
                    .expect("record")
            }
        };
        assert!(
            store
                .stored_current(Slot::Validate)
                .await
                .expect("empty")
                .is_none()
        );
        record(b"file", SwapSource::File, 1).await;
        // The same file again (a restart) is not a new install.
        record(b"file", SwapSource::File, 2).await;
        let a = record(b"upload a", SwapSource::Upload, 3).await;
        let b = record(b"upload b", SwapSource::Upload, 4).await;
        assert_eq!(
            store
                .history(Slot::Validate)
                .await
                .expect("h")
                .entries
                .len(),
            3
        );
        let (current, bytes) = store
            .stored_current(Slot::Validate)
            .await
            .expect("read")
            .expect("an upload serves");
        assert_eq!(
            (current.sha256.as_str(), bytes.as_slice()),
            (b.sha256.as_str(), &b"upload b"[..])
        );

        // Two rollbacks go two installs back, not back and forth.
        let (entry, _) = store
            .rollback_target(Slot::Validate, None)
            .await
            .expect("one back");
        assert_eq!(entry.sha256, a.sha256);
        store
            .rolled_back_to(Slot::Validate, &entry)
            .await
            .expect("mark");
        let (file, bytes) = store
            .rollback_target(Slot::Validate, None)
            .await
            .expect("two back");
        assert_eq!(bytes, b"file");
        store
            .rolled_back_to(Slot::Validate, &file)
            .await
            .expect("mark");
        assert!(matches!(
            store.rollback_target(Slot::Validate, None).await,
            Err(SwapError::NothingEarlier(Slot::Validate))
        ));
        // Rolled back to the file's component: a restart loads that stored copy.
        assert_eq!(
            store
                .stored_current(Slot::Validate)
                .await
                .expect("read")
                .map(|(e, _)| e.sha256),
            Some(file.sha256.clone())
        );
        // By digest, forwards too.
        let (entry, _) = store
            .rollback_target(Slot::Validate, Some(&b.sha256))
            .await
            .expect("by digest");
        assert_eq!(entry, b);
        store
            .rolled_back_to(Slot::Validate, &entry)
            .await
            .expect("mark");
        // An upload after a rollback rolls back to what it replaced, not to what was undone.
        store
            .rolled_back_to(Slot::Validate, &file)
            .await
            .expect("back to the file");
        record(b"upload c", SwapSource::Upload, 5).await;
        let (_, bytes) = store
            .rollback_target(Slot::Validate, None)
            .await
            .expect("from c");
        assert_eq!(bytes, b"file");
        assert!(matches!(
            store.rollback_target(Slot::Validate, Some("00")).await,
            Err(SwapError::UnknownDigest { .. })
        ));
    }

    #[tokio::test]
    async fn past_the_limit_the_oldest_go_with_their_files_and_damage_is_caught() {
        let dir = tempfile::tempdir().expect("temp dir");
        let local = LocalSwaps::new(dir.path());
        let first_file = |sha256: &str| local.component_file(Slot::Auth, sha256);
        let store = SwapStore::local(dir.path());
        let first = store
            .record(Slot::Auth, b"v0", SwapSource::Upload, 0)
            .await
            .expect("v0");
        for i in 1..=KEEP {
            store
                .record(
                    Slot::Auth,
                    format!("v{i}").as_bytes(),
                    SwapSource::Upload,
                    i as i64,
                )
                .await
                .expect("record");
        }
        let history = store.history(Slot::Auth).await.expect("h");
        assert_eq!(history.entries.len(), KEEP);
        assert!(history.entries.iter().all(|e| e.sha256 != first.sha256));
        assert!(!first_file(&first.sha256).exists());
        // A rollback to an entry that left the history meanwhile changes nothing.
        assert!(matches!(
            store.rolled_back_to(Slot::Auth, &first).await,
            Err(SwapError::Gone { .. })
        ));
        // A stored component whose bytes changed is refused, not loaded.
        let current = history.current().expect("current").clone();
        std::fs::write(first_file(&current.sha256), b"tampered").expect("write");
        assert!(matches!(
            store.stored_current(Slot::Auth).await,
            Err(SwapError::Damaged { .. })
        ));
    }
}
