//! One claimed job, from claim to its final state: checked still ours, rendered to
//! `<work>/<id>-<attempt>.mp4` with progress recorded, published, and its end counted and
//! logged. A failure reaches the client as a category and an error id, a panic as an internal
//! error; the worker thread survives both.

use super::Shared;
use crate::engine::{RenderError, Renderer};
use crate::ids::new_error_id;
use crate::jobs::{Job, JobState, StoredPreview};
use crate::pipeline::unipc::UniPcError;
use crate::pipeline::{CancelToken, GenerateRequest, PipelineError, Progress};
use std::time::Instant;

pub(super) enum Outcome {
    Published,
    /// Cancelled by the client (the store already says so), or no longer this attempt's.
    Cancelled,
    /// Stopped for shutdown: back in the queue.
    Requeued,
    Failed,
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Published => "succeeded",
            Outcome::Cancelled => "cancelled",
            Outcome::Requeued => "requeued",
            Outcome::Failed => "failed",
        }
    }
}

/// Why a job failed, for the client: a category and an id to find the details in the log
/// (never a path, a stack trace or the runtime's own message).
pub(super) fn client_reason(error: &RenderError, error_id: &str) -> String {
    let what = match error {
        RenderError::Encode(_) => "encoding the video failed",
        RenderError::Pipeline(PipelineError::InvalidRequest { field, reason }) => {
            return format!("the model cannot run this request: {field}: {reason}");
        }
        RenderError::Pipeline(e) if e.is_out_of_memory() => "out of memory",
        // Runtime failures: the model's graphs, or the tensor arithmetic beside them.
        RenderError::Pipeline(
            PipelineError::Backend(_)
            | PipelineError::Arithmetic(_)
            | PipelineError::UniPc(UniPcError::Arithmetic(_)),
        ) => "the model failed to run",
        RenderError::Pipeline(_) => "generation failed",
    };
    format!("{what} (error id {error_id})")
}

impl Shared {
    pub(super) fn run(&self, renderer: &dyn Renderer, job: Job) {
        let span = tracing::info_span!("job", request_id = %job.id, attempt = job.attempt);
        let _in_job = span.enter();
        let started = Instant::now();
        let cancel = CancelToken::default();
        let request = job.request.generate_request();
        let pixel_frames = request.width * request.height * request.num_frames;
        self.jobs.start(
            &job.id,
            job.attempt,
            cancel.clone(),
            renderer.skip_plan(&request),
            pixel_frames as f64,
        );
        // An earlier attempt that stopped (its host died) may have published under the key it
        // recorded: the run below publishes the only copy.
        if let Some(stale) = &job.pending_key
            && let Err(e) = self.block_on(self.videos.delete(stale))
        {
            tracing::warn!(error = %e, "cannot remove an earlier attempt's video");
        }
        // A shutdown or a cancel may have come between the claim and the line above.
        let still_ours = !self.stopping()
            && matches!(
                self.block_on(self.store.get(&job.id)),
                Ok(Some(j)) if j.state == JobState::Running && j.attempt == job.attempt
            );
        let outcome = if !still_ours {
            self.stopped(&job)
        } else {
            tracing::info!("job started");
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.render_and_publish(renderer, &job, &request, &cancel, started)
            }));
            run.unwrap_or_else(|_| {
                let error_id = new_error_id();
                tracing::error!(error_id, "generation panicked");
                self.fail(&job, &format!("internal error (error id {error_id})"))
            })
        };
        self.jobs.finish(&job.id);
        // A preview is only for watching the run; the video is what stays.
        if let Err(e) = self.block_on(self.store.clear_preview(&job.id, job.attempt)) {
            tracing::warn!(error = %e, "cannot clear the job's preview");
        }
        self.changed(&job.id);
        let seconds = started.elapsed().as_secs_f64();
        let label = outcome.label();
        metrics::histogram!("wanserve_job_duration_seconds", "outcome" => label).record(seconds);
        metrics::counter!("wanserve_jobs_total", "outcome" => label).increment(1);
        if matches!(outcome, Outcome::Published) {
            self.jobs.job_finished(seconds);
        }
        let peak_rss_mib = crate::peak_memory::peak_bytes().map(|b| b >> 20);
        let rss_mib = crate::peak_memory::resident_bytes().map(|b| b >> 20);
        tracing::info!(outcome = label, seconds, peak_rss_mib, rss_mib, "job ended");
    }

    fn render_and_publish(
        &self,
        renderer: &dyn Renderer,
        job: &Job,
        request: &GenerateRequest,
        cancel: &CancelToken,
        started: Instant,
    ) -> Outcome {
        let temp = self
            .config
            .work_dir
            .join(format!("{}-{}.mp4", job.id, job.attempt));
        let mut on_progress = |p: Progress| self.record_progress(job, p);
        let rendered = match renderer.render(request, &temp, cancel, &mut on_progress) {
            Ok(rendered) => rendered,
            Err(RenderError::Pipeline(PipelineError::Cancelled)) => return self.stopped(job),
            Err(e) => {
                let error_id = new_error_id();
                tracing::error!(error_id, error = %e, "generation failed");
                return self.fail(job, &client_reason(&e, &error_id));
            }
        };
        if let Some(decode) = rendered.decode_time {
            let pixel_frames = request.width * request.height * request.num_frames;
            self.jobs.decoded(decode.as_secs_f64(), pixel_frames);
        }
        let outcome = self.publish(job, &rendered.path, started.elapsed().as_secs_f64());
        let _ = std::fs::remove_file(&rendered.path);
        outcome
    }

    /// A job that stopped without failing: shutdown puts it back in the queue, otherwise it
    /// was cancelled (the store already says so) or is no longer this attempt's.
    fn stopped(&self, job: &Job) -> Outcome {
        if !self.stopping() {
            return Outcome::Cancelled;
        }
        if let Err(e) = self.block_on(self.store.requeue(&job.id, job.attempt)) {
            tracing::error!(error = %e, "cannot put the job back in the queue");
        }
        Outcome::Requeued
    }

    /// Logs `error` with a fresh error id and fails the job with `what` and that id (the
    /// client sees the category and the id, never the error itself).
    pub(super) fn fail_logged(
        &self,
        job: &Job,
        what: &str,
        context: &str,
        error: &dyn std::fmt::Display,
    ) -> Outcome {
        let error_id = new_error_id();
        tracing::error!(error_id, error = %error, "{context}");
        self.fail(job, &format!("{what} (error id {error_id})"))
    }

    /// A job for a model this host does not serve (a fleet whose hosts were given different
    /// `--model` lists, or a model removed since the job was queued): failed, saying so.
    pub(super) fn unserved(&self, job: Job) {
        let span = tracing::info_span!("job", request_id = %job.id, attempt = job.attempt);
        let _in_job = span.enter();
        tracing::error!(model = %job.request.model, "a job for a model this host does not serve");
        self.fail(
            &job,
            &format!("this server does not serve model {:?}", job.request.model),
        );
        metrics::counter!("wanserve_jobs_total", "outcome" => Outcome::Failed.label()).increment(1);
        self.changed(&job.id);
    }

    fn fail(&self, job: &Job, reason: &str) -> Outcome {
        if let Err(e) = self.block_on(self.store.fail(&job.id, job.attempt, reason)) {
            tracing::error!(error = %e, "cannot record the failure");
        }
        Outcome::Failed
    }

    fn record_progress(&self, job: &Job, p: Progress) {
        let Some(stored) = self
            .jobs
            .record(&job.id, job.attempt, p.stage, p.step, p.total)
        else {
            return;
        };
        // The last recorded step is what a cancelled job reports; losing one on a store error
        // only makes progress stale.
        if let Err(e) = self.block_on(self.store.set_progress(&job.id, job.attempt, &stored)) {
            tracing::warn!(error = %e, "cannot record progress");
        }
        if let Some(preview) = &p.preview {
            let fits = |v: usize| u32::try_from(v).ok();
            if let (Some(step), Some(total), Some(width), Some(height)) = (
                fits(preview.step),
                fits(preview.total),
                fits(preview.width),
                fits(preview.height),
            ) {
                let stored = StoredPreview {
                    attempt: job.attempt,
                    step,
                    total,
                    width,
                    height,
                    png: preview.png.clone(),
                };
                // Stored with the row (after its step, which it never runs ahead of), so a
                // stream on any host of a fleet sees it.
                if let Err(e) = self.block_on(self.store.set_preview(&job.id, job.attempt, &stored))
                {
                    tracing::warn!(error = %e, "cannot record a preview");
                }
            }
        }
        self.changed(&job.id);
    }
}
