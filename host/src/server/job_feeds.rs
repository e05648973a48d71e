//! One reader per followed job, however many streams follow it: a feed task reads the job when
//! the job workers announce a change to it (and at least every [`REREAD`], since queue positions
//! move when other jobs end and another host of a fleet announces nothing here), and publishes
//! the status on a `watch` channel every stream of that job subscribes to. A hundred streams on
//! one job cost one read per change, not a hundred.
//!
//! The feed ends (and leaves the map) after the final status, when the job cannot be read, at
//! shutdown, or within one [`REREAD`] of its last subscriber leaving.

use crate::sync::lock;
use crate::wire::StatusResponse;
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, watch};

/// A feed re-reads its job at least this often.
pub const REREAD: Duration = Duration::from_secs(1);

/// What a feed publishes: the job's status as JSON, or `None` once the job cannot be read.
pub type FeedValue = Option<Arc<Published>>;

#[derive(Debug)]
pub struct Published {
    pub json: String,
    pub is_final: bool,
    /// The running job's latest live preview, if it has one.
    pub preview: Option<PublishedPreview>,
}

/// A live preview as a stream sends it (`event: preview`).
#[derive(Debug)]
pub struct PublishedPreview {
    /// Which attempt and step made it (a stream sends each once).
    pub attempt: i64,
    pub step: u32,
    pub json: String,
}

impl Published {
    pub fn of(status: &StatusResponse, preview: Option<PublishedPreview>) -> Option<Arc<Self>> {
        Some(Arc::new(Self {
            json: serde_json::to_string(status).ok()?,
            is_final: status.status.is_final(),
            preview,
        }))
    }

    /// The preview's attempt and step.
    pub fn preview_key(&self) -> Option<(i64, u32)> {
        self.preview.as_ref().map(|p| (p.attempt, p.step))
    }

    fn same_as(&self, other: &Self) -> bool {
        self.json == other.json && self.preview_key() == other.preview_key()
    }
}

/// How a feed reads its job's status (and latest preview) now (`None`: the job cannot be read).
/// The caller supplies it, so feeds know nothing of the server's state.
pub type ReadStatus = Arc<dyn Fn(String) -> BoxFuture<'static, FeedValue> + Send + Sync>;

/// The feeds running now, by job id. Each entry keeps one receiver, so new subscribers clone it.
#[derive(Default)]
pub struct JobFeeds {
    feeds: FeedMap,
}

impl JobFeeds {
    /// A subscription to `id`'s feed, started if none runs. `changes` must have been taken
    /// before `first` was read (so no change between the two is missed); `first` seeds a new
    /// feed, and is the first thing its subscribers see.
    /// A feed ends at the latest when `shutting_down` becomes true.
    pub fn subscribe(
        &self,
        id: &str,
        changes: broadcast::Receiver<Arc<str>>,
        first: &FeedValue,
        read: ReadStatus,
        shutting_down: watch::Receiver<bool>,
    ) -> watch::Receiver<FeedValue> {
        let mut map = lock(&self.feeds);
        if let Some(existing) = map.get(id) {
            return existing.clone();
        }
        let published = first.clone();
        let ended = published.as_ref().is_none_or(|p| p.is_final);
        let (sender, receiver) = watch::channel(published);
        if !ended {
            map.insert(id.to_string(), receiver.clone());
            let feed = Feed {
                feeds: self.feeds.clone(),
                id: id.to_string(),
                read,
                shutting_down,
            };
            tokio::spawn(feed.run(sender, changes));
        }
        receiver
    }
}

type FeedMap = Arc<Mutex<HashMap<String, watch::Receiver<FeedValue>>>>;

/// One running feed: what it needs to read its job and to leave the map.
struct Feed {
    feeds: FeedMap,
    id: String,
    read: ReadStatus,
    shutting_down: watch::Receiver<bool>,
}

impl Feed {
    async fn run(
        self,
        sender: watch::Sender<FeedValue>,
        mut changes: broadcast::Receiver<Arc<str>>,
    ) {
        let id = self.id.clone();
        let mut shutting_down = self.shutting_down.clone();
        loop {
            tokio::select! {
                _ = tokio::time::timeout(REREAD, job_changed(&mut changes, &id)) => {}
                _ = shutting_down.wait_for(|stopping| *stopping) => break,
            }
            // The map's own receiver is the one left: nobody follows any more. Checked under the
            // map's lock, so a subscriber cannot clone the receiver between the check and removal.
            {
                let mut map = lock(&self.feeds);
                if sender.receiver_count() <= 1 {
                    map.remove(&id);
                    return;
                }
            }
            // What the fan-out saves is visible: one read per feed, however many follow it.
            metrics::counter!("wanserve_event_feed_reads_total").increment(1);
            let published = (self.read)(id.clone()).await;
            let ended = published.as_ref().is_none_or(|p| p.is_final);
            sender.send_if_modified(|current| {
                let same = match (current.as_ref(), published.as_ref()) {
                    (Some(a), Some(b)) => a.same_as(b),
                    (None, None) => true,
                    _ => false,
                };
                if !same {
                    *current = published;
                }
                !same
            });
            if ended {
                break;
            }
        }
        lock(&self.feeds).remove(&id);
    }
}

/// Returns when `id` is announced on `changes` (or some announcements were missed).
async fn job_changed(changes: &mut broadcast::Receiver<Arc<str>>, id: &str) {
    loop {
        match changes.recv().await {
            Ok(changed) if *changed == *id => return,
            Ok(_) => {}
            // Fell behind: whatever happened, re-read.
            Err(RecvError::Lagged(_)) => return,
            Err(RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}
