//! A rendered video to a succeeded job: the post-process plugin's policy (the host's default
//! when it fails), the key recorded as `pending_key`, one atomic put to the object store, then
//! `running → succeeded` fenced on the attempt.

use super::Shared;
use super::run::Outcome;
use crate::ids::now_ms;
use crate::jobs::{Completion, Job, JobState};
use crate::plugins::{FinishedJob, OutputPolicy};
use std::path::Path;

impl Shared {
    pub(super) fn publish(&self, job: &Job, file: &Path, inference_seconds: f64) -> Outcome {
        let finished_at = now_ms();
        let policy = self
            .plugins
            .decide(&FinishedJob {
                request_id: job.id.clone(),
                caller: (&job.principal).into(),
                request: (&job.request).into(),
                finished_at: finished_at.max(0) as u64,
                inference_seconds: inference_seconds as f32,
            })
            .unwrap_or_else(|e| {
                // The plugin host already logged and counted the failure; the video is not lost.
                tracing::warn!(error = %e, "post-process plugin failed: default policy");
                OutputPolicy {
                    object_key: format!("{}.mp4", job.id),
                    retention_seconds: self.config.default_retention.as_secs(),
                    metadata: Vec::new(),
                }
            });
        let key = policy.object_key;
        match self.block_on(self.store.set_pending_key(&job.id, job.attempt, &key)) {
            Ok(true) => {}
            Ok(false) => return Outcome::Cancelled,
            Err(e) => {
                return self.fail_logged(
                    job,
                    "storing the video failed",
                    "cannot record the video key",
                    &e,
                );
            }
        }
        if let Err(e) = self.block_on(self.videos.publish(file, &key)) {
            return self.fail_logged(
                job,
                "storing the video failed",
                "cannot publish the video",
                &e,
            );
        }
        let retention_ms =
            i64::try_from(policy.retention_seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
        let done = Completion {
            object_key: key.clone(),
            expires_at: finished_at.saturating_add(retention_ms),
            inference_seconds,
            metadata: policy.metadata,
        };
        match self.block_on(self.store.complete(&job.id, job.attempt, &done)) {
            Ok(true) => Outcome::Published,
            Ok(false) => {
                // Cancelled while publishing: the client asked for no video. Otherwise another
                // attempt runs the job now (this one's lease passed): the key may be that
                // attempt's too, so the object is left to it.
                let cancelled = matches!(
                    self.block_on(self.store.get(&job.id)),
                    Ok(Some(j)) if j.state == JobState::Cancelled
                );
                if cancelled {
                    if let Err(e) = self.block_on(self.videos.delete(&key)) {
                        tracing::warn!(error = %e, "cannot delete a cancelled job's video");
                    }
                } else {
                    tracing::warn!(
                        key,
                        "lost the job to a later attempt while publishing; leaving the object to it"
                    );
                }
                Outcome::Cancelled
            }
            Err(e) => {
                // The video is published but the row still says running until recovery (the
                // next start, or a lapsed lease in a shared store) queues it again.
                let error_id = crate::ids::new_error_id();
                tracing::error!(error_id, error = %e, "cannot record the finished job");
                Outcome::Failed
            }
        }
    }
}
