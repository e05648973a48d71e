//! The retention sweeper: videos whose time is up are deleted only when the post-process
//! plugin's `retain` says so (any failure keeps them), and the job records the deletion.

use super::JobStore;
use crate::ids::now_ms;
use crate::plugins::{PluginHost, RetentionDecision, StoredVideo};
use crate::storage::VideoStore;
use std::sync::Arc;
use std::time::Duration;

/// Videos looked at per pass.
const BATCH: u32 = 100;
/// A video the plugin kept is offered to it again after this long.
const ASK_AGAIN_AFTER: Duration = Duration::from_secs(600);

pub struct Sweeper {
    pub store: Arc<dyn JobStore>,
    pub videos: Arc<VideoStore>,
    pub plugins: Arc<PluginHost>,
    pub interval: Duration,
}

impl Sweeper {
    /// Runs until `stop` fires.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            if let Err(e) = self.sweep_once().await {
                tracing::warn!(error = %e, "retention sweep failed; will retry");
            }
        }
    }

    /// One pass; returns how many videos were deleted.
    pub async fn sweep_once(&self) -> Result<usize, super::StoreError> {
        let now = now_ms();
        let _ = self.store.prune_idempotency_keys(now).await?;
        let due = self
            .store
            .expired_videos(now, now - ASK_AGAIN_AFTER.as_millis() as i64, BATCH)
            .await?;
        let mut deleted = 0;
        for job in due {
            let Some(key) = job.object_key.clone() else {
                continue;
            };
            let video = StoredVideo {
                object_key: key.clone(),
                caller_id: job.principal.id.clone(),
                created_at: job.finished_at.unwrap_or(job.created_at).max(0) as u64,
                expires_at: job.expires_at.unwrap_or(now).max(0) as u64,
                metadata: job.metadata.clone(),
            };
            let plugins = self.plugins.clone();
            let decision =
                tokio::task::spawn_blocking(move || plugins.retain(&video, now.max(0) as u64))
                    .await
                    .unwrap_or(RetentionDecision::Keep);
            if decision == RetentionDecision::Keep {
                self.store.mark_video_kept(&job.id, now).await?;
                continue;
            }
            match self.videos.delete(&key).await {
                Ok(()) => {
                    self.store.mark_video_deleted(&job.id, now_ms()).await?;
                    metrics::counter!("wanserve_videos_deleted_total").increment(1);
                    tracing::info!(request_id = %job.id, key, "expired video deleted");
                    deleted += 1;
                }
                Err(e) => {
                    tracing::warn!(request_id = %job.id, error = %e, "cannot delete an expired video")
                }
            }
        }
        Ok(deleted)
    }
}
