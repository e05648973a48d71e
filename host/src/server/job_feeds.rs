//! One reader per followed job, however many streams follow it: a feed task reads the job when
//! the job workers announce a change to it (and at least every [`REREAD`], since queue positions
//! move when other jobs end and another host of a fleet announces nothing here), and publishes
//! the status on a `watch` channel every stream of that job subscribes to. A hundred streams on
//! one job cost one read per change, not a hundred.
//!
//! The feed ends (and leaves the map) after the final status, when the job cannot be read, at
//! shutdown, or within one [`REREAD`] of its last subscriber leaving.

use super::AppState;
use super::api::status_view;
use crate::sync::lock;
use crate::wire::StatusResponse;
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
}

impl Published {
    pub fn of(status: &StatusResponse) -> Option<Arc<Self>> {
        Some(Arc::new(Self {
            json: serde_json::to_string(status).ok()?,
            is_final: status.status.is_final(),
        }))
    }
}

/// The feeds running now, by job id. Each entry keeps one receiver, so new subscribers clone it.
#[derive(Default)]
pub struct JobFeeds {
    feeds: Arc<Mutex<HashMap<String, watch::Receiver<FeedValue>>>>,
}

impl JobFeeds {
    /// A subscription to `id`'s feed, started if none runs. `changes` must have been taken
    /// before `first` was read (so no change between the two is missed); `first` seeds a new
    /// feed, and is the first thing its subscribers see.
    pub fn subscribe(
        state: &Arc<AppState>,
        id: &str,
        changes: broadcast::Receiver<Arc<str>>,
        first: &StatusResponse,
    ) -> watch::Receiver<FeedValue> {
        let feeds = &state.feeds;
        let mut map = lock(&feeds.feeds);
        if let Some(existing) = map.get(id) {
            return existing.clone();
        }
        let published = Published::of(first);
        let ended = published.as_ref().is_none_or(|p| p.is_final);
        let (sender, receiver) = watch::channel(published);
        if !ended {
            map.insert(id.to_string(), receiver.clone());
            let state = state.clone();
            let id = id.to_string();
            tokio::spawn(async move { run_feed(state, id, sender, changes).await });
        }
        receiver
    }
}

async fn run_feed(
    state: Arc<AppState>,
    id: String,
    sender: watch::Sender<FeedValue>,
    mut changes: broadcast::Receiver<Arc<str>>,
) {
    let mut shutting_down = state.shutting_down.clone();
    loop {
        tokio::select! {
            _ = tokio::time::timeout(REREAD, job_changed(&mut changes, &id)) => {}
            _ = shutting_down.wait_for(|stopping| *stopping) => break,
        }
        // The map's own receiver is the one left: nobody follows any more. Checked under the
        // map's lock, so a subscriber cannot clone the receiver between the check and removal.
        {
            let mut map = lock(&state.feeds.feeds);
            if sender.receiver_count() <= 1 {
                map.remove(&id);
                return;
            }
        }
        // What the fan-out saves is visible: one read per feed, however many follow it.
        metrics::counter!("wanserve_event_feed_reads_total").increment(1);
        let status = match state.store.get(&id).await {
            Ok(Some(job)) => status_view(&state, job).await.ok(),
            _ => None,
        };
        let published = status.as_ref().and_then(Published::of);
        let ended = published.as_ref().is_none_or(|p| p.is_final);
        sender.send_if_modified(|current| {
            let same = match (current.as_ref(), published.as_ref()) {
                (Some(a), Some(b)) => a.json == b.json,
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
    lock(&state.feeds.feeds).remove(&id);
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
