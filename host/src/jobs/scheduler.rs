//! Runs queued jobs: `slots` dedicated OS threads (generation blocks for seconds to minutes, and
//! the ffmpeg writer is not `Send`), each claiming the oldest queued job from the store and
//! running it through the one shared pipeline. Never on the async runtime: the workers only
//! `block_on` the store's short queries.
//!
//! Cancel: the store marks the job cancelled at once (durable); the worker's [`CancelToken`] is
//! set and the pipeline stops before its next step, and the worker takes the next job.
//! Shutdown: every running job is stopped the same way and put back in the queue.

use super::eta::StepClock;
use super::{Completion, Job, JobStore, StoredProgress, now_ms};
use crate::backend::OrtBackend;
use crate::pipeline::scheduler::SchedulerError;
use crate::pipeline::step_cache::SkipPlan;
use crate::pipeline::{CancelToken, FrameChunk, Pipeline, PipelineError, Stage};
use crate::plugins::{FinishedJob, OutputPolicy, PluginHost};
use crate::storage::VideoStore;
use crate::video::{EncoderSettings, Mp4Writer};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub type SharedPipeline = Arc<Pipeline<OrtBackend>>;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Jobs running at once.
    pub slots: usize,
    /// Where videos are encoded before they are published (cleared at start).
    pub work_dir: PathBuf,
    /// Retention when the post-process plugin fails (the seed's default: one hour).
    pub default_retention: Duration,
    /// How often an idle worker looks at the queue without being woken (other processes may
    /// add jobs; a missed wake-up costs at most this).
    pub idle_poll: Duration,
    /// How often the leases of running jobs are renewed in a shared store (a third of the
    /// lease, so two renewals may fail before it runs out).
    pub lease_renewal: Duration,
}

/// What a running job is doing, for `/video/status`.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveProgress {
    pub stage: &'static str,
    pub step: u32,
    pub total: u32,
    /// Seconds until the video should be ready (an estimate from this job's step times and
    /// earlier jobs' decoding).
    pub eta_seconds: Option<f64>,
}

struct Running {
    attempt: i64,
    cancel: CancelToken,
    stage: Stage,
    step: usize,
    total: usize,
    last_step: Option<Instant>,
    /// The denoising steps' times, knowing which skip the blocks.
    steps: StepClock,
    /// Frames × pixels this job decodes, to scale earlier jobs' decode times.
    work: f64,
}

#[derive(Default)]
struct Timing {
    /// Seconds of VAE decoding + encoding per frame-pixel, from the last finished job.
    decode_per_unit: Option<f64>,
    /// Wall seconds of the last finished jobs (for Retry-After).
    last_job_seconds: Option<f64>,
    /// A block-skipping DiT pass's cost relative to a full one, from the last job that had both.
    skip_fraction: Option<f64>,
}

struct Inner {
    store: Arc<dyn JobStore>,
    videos: Arc<VideoStore>,
    plugins: Arc<PluginHost>,
    pipeline: OnceLock<SharedPipeline>,
    runtime: tokio::runtime::Handle,
    config: SchedulerConfig,
    /// Bumped on every wake-up; workers wait for it to change.
    wake: Mutex<u64>,
    woken: Condvar,
    running: Mutex<HashMap<String, Running>>,
    stopping: AtomicBool,
    timing: Mutex<Timing>,
    /// The id of a job whose state or progress just changed (for live progress streams).
    changes: tokio::sync::broadcast::Sender<Arc<str>>,
}

pub struct Scheduler {
    inner: Arc<Inner>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A worker that panicked mid-update leaves plain data behind, still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Scheduler {
    /// Starts the workers; they wait until [`Scheduler::set_pipeline`] hands them the model.
    pub fn start(
        store: Arc<dyn JobStore>,
        videos: Arc<VideoStore>,
        plugins: Arc<PluginHost>,
        runtime: tokio::runtime::Handle,
        config: SchedulerConfig,
    ) -> std::io::Result<Arc<Self>> {
        std::fs::create_dir_all(&config.work_dir)?;
        // Leftovers of attempts that died: their jobs are back in the queue.
        for entry in std::fs::read_dir(&config.work_dir)?.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        // 0 on an API-only host: it takes requests and reads progress, other hosts run jobs.
        let slots = config.slots;
        let renewal = config.lease_renewal;
        let inner = Arc::new(Inner {
            store,
            videos,
            plugins,
            pipeline: OnceLock::new(),
            runtime,
            config,
            wake: Mutex::new(0),
            woken: Condvar::new(),
            running: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            timing: Mutex::new(Timing::default()),
            // Subscribers re-read the job on each id; one that falls this far behind re-reads
            // it once (a lagged receiver), so the bound only limits memory.
            changes: tokio::sync::broadcast::channel(256).0,
        });
        inner.runtime.spawn(inner.clone().keep_leases(renewal));
        let mut workers = Vec::with_capacity(slots);
        for slot in 0..slots {
            let inner = inner.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("wanserve-slot-{slot}"))
                    .spawn(move || inner.work())?,
            );
        }
        Ok(Arc::new(Self {
            inner,
            workers: Mutex::new(workers),
        }))
    }

    /// Hands the loaded model to the workers; they start claiming jobs.
    pub fn set_pipeline(&self, pipeline: SharedPipeline) {
        let _ = self.inner.pipeline.set(pipeline);
        self.wake_all();
    }

    pub fn pipeline(&self) -> Option<&SharedPipeline> {
        self.inner.pipeline.get()
    }

    /// A job was queued: one idle worker looks at the queue now.
    pub fn wake(&self) {
        *lock(&self.inner.wake) += 1;
        self.inner.woken.notify_one();
    }

    fn wake_all(&self) {
        *lock(&self.inner.wake) += 1;
        self.inner.woken.notify_all();
    }

    /// Stops `id` at its next step if this process runs it (the store already says cancelled).
    pub fn cancel_running(&self, id: &str) -> bool {
        match lock(&self.inner.running).get(id) {
            Some(r) => {
                r.cancel.cancel();
                true
            }
            None => false,
        }
    }

    pub fn running(&self) -> usize {
        lock(&self.inner.running).len()
    }

    /// Ids of jobs whose state or progress changed in this process, as they change.
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.inner.changes.subscribe()
    }

    /// Tells [`Scheduler::changes`] subscribers that `id` changed outside the workers (a cancel
    /// of a queued job).
    pub fn changed(&self, id: &str) {
        self.inner.changed(id);
    }

    /// Progress of `id` if this process runs it.
    pub fn progress(&self, id: &str) -> Option<LiveProgress> {
        self.inner.live_progress(id)
    }

    /// Seconds a client could wait before a slot is likely free (for `Retry-After`).
    pub fn retry_after_seconds(&self) -> u64 {
        let last = lock(&self.inner.timing).last_job_seconds.unwrap_or(30.0);
        (last / self.inner.config.slots.max(1) as f64)
            .ceil()
            .clamp(1.0, 3600.0) as u64
    }

    /// Stops claiming, stops running jobs at their next step and puts them back in the queue,
    /// then waits for the workers. Blocking: call it off the async runtime.
    pub fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        for r in lock(&self.inner.running).values() {
            r.cancel.cancel();
        }
        self.wake_all();
        let workers: Vec<_> = lock(&self.workers).drain(..).collect();
        for w in workers {
            let _ = w.join();
        }
    }
}

/// Why a job failed, for the client: a category and an id to find the details in the log
/// (never a path, a stack trace or the runtime's own message).
fn client_reason(error: &PipelineError, error_id: &str) -> String {
    let what = match error {
        PipelineError::InvalidRequest { field, reason } => {
            return format!("the model cannot run this request: {field}: {reason}");
        }
        // Runtime failures: the model's graphs, or the tensor arithmetic beside them.
        PipelineError::Backend(_)
        | PipelineError::Arithmetic(_)
        | PipelineError::Scheduler(SchedulerError::Arithmetic(_)) => {
            if looks_like_oom(&error.to_string()) {
                "out of memory"
            } else {
                "the model failed to run"
            }
        }
        PipelineError::Sink(_) => "encoding the video failed",
        _ => "generation failed",
    };
    format!("{what} (error id {error_id})")
}

fn looks_like_oom(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("out of memory") || m.contains("failed to allocate") || m.contains("bad_alloc")
}

pub fn new_error_id() -> String {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    hex::encode(bytes)
}

enum Outcome {
    Published,
    /// Cancelled by the client (the store already says so).
    Cancelled,
    /// Stopped for shutdown: back in the queue.
    Requeued,
    Failed,
}

impl Inner {
    /// Renews the leases of the jobs this process runs, and stops those it no longer holds or
    /// that another process cancelled (a shared store tells at once; the renewal is the
    /// fallback). Runs for the life of the process.
    async fn keep_leases(self: Arc<Self>, every: Duration) {
        let mut cancellations = self.store.cancellations();
        let mut queued = self.store.queued();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let cancelled_elsewhere = async {
                match cancellations.as_mut() {
                    Some(rx) => rx.recv().await.ok(),
                    None => std::future::pending().await,
                }
            };
            let queued_elsewhere = async {
                match queued.as_mut() {
                    // A lagged receiver still means jobs were queued.
                    Some(rx) => {
                        if let Err(tokio::sync::broadcast::error::RecvError::Closed) =
                            rx.recv().await
                        {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tick.tick() => {
                    let held: Vec<(String, i64)> = lock(&self.running)
                        .iter()
                        .map(|(id, r)| (id.clone(), r.attempt))
                        .collect();
                    match self.store.renew_leases(&held).await {
                        Ok(lost) => {
                            for id in lost {
                                if let Some(r) = lock(&self.running).get(&id) {
                                    tracing::warn!(request_id = %id, attempt = r.attempt, "no longer this process's job (cancelled, or its lease passed to another host); stopping it");
                                    r.cancel.cancel();
                                }
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot renew job leases"),
                    }
                }
                _ = queued_elsewhere => {
                    *lock(&self.wake) += 1;
                    self.woken.notify_one();
                }
                Some(id) = cancelled_elsewhere => {
                    if let Some(r) = lock(&self.running).get(&id) {
                        r.cancel.cancel();
                    }
                }
            }
        }
    }

    /// Progress of `id` if this process runs it, with the ETA.
    fn live_progress(&self, id: &str) -> Option<LiveProgress> {
        let (decode_per_unit, skip_fraction) = {
            let timing = lock(&self.timing);
            (timing.decode_per_unit, timing.skip_fraction)
        };
        let running = lock(&self.running);
        let r = running.get(id)?;
        let stage = match r.stage {
            Stage::EncodingText => "encoding_text",
            Stage::Denoising => "denoising",
            Stage::Decoding => "decoding",
        };
        let decode_estimate = decode_per_unit.map(|per| per * r.work);
        let eta_seconds = match (r.stage, r.last_step) {
            (Stage::Denoising, Some(last)) if r.step > 0 => {
                let in_step = last.elapsed().as_secs_f64();
                // Before any job has been decoded, the estimate covers denoising only.
                r.steps
                    .remaining(r.step, in_step, skip_fraction)
                    .map(|left| left + decode_estimate.unwrap_or(0.0))
            }
            (Stage::Decoding, Some(last)) if r.step > 0 => decode_estimate.map(|d| {
                let done = r.step as f64 / r.total.max(1) as f64;
                (d * (1.0 - done) - last.elapsed().as_secs_f64()).max(0.0)
            }),
            _ => None,
        };
        Some(LiveProgress {
            stage,
            step: r.step as u32,
            total: r.total as u32,
            eta_seconds,
        })
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    fn work(self: Arc<Self>) {
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let seen = *lock(&self.wake);
            let claimed = match self.pipeline.get() {
                None => None,
                Some(pipeline) => match self.block_on(self.store.claim_next()) {
                    Ok(job) => job.map(|job| (pipeline.clone(), job)),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot claim a job");
                        None
                    }
                },
            };
            match claimed {
                Some((pipeline, job)) => self.run(&pipeline, job),
                None => {
                    let guard = lock(&self.wake);
                    if *guard == seen && !self.stopping.load(Ordering::SeqCst) {
                        let _ = self
                            .woken
                            .wait_timeout(guard, self.config.idle_poll)
                            .unwrap_or_else(|p| p.into_inner());
                    }
                }
            }
        }
    }

    fn run(&self, pipeline: &SharedPipeline, job: Job) {
        let started = Instant::now();
        let cancel = CancelToken::default();
        let request = &job.request;
        let work = request.width as f64 * request.height as f64 * request.num_frames as f64;
        let mut running = lock(&self.running);
        // Alone, this job's peak is the process's from here (see `peak_memory`).
        if running.is_empty() {
            crate::peak_memory::reset();
        }
        running.insert(
            job.id.clone(),
            Running {
                attempt: job.attempt,
                cancel: cancel.clone(),
                stage: Stage::EncodingText,
                step: 0,
                total: 1,
                last_step: None,
                steps: StepClock::new(
                    crate::pipeline::skip_plan(pipeline.manifest(), &request.generate_request())
                        .unwrap_or_else(|_| {
                            SkipPlan::none(
                                request.infer_steps as usize,
                                request.guidance_scale > 1.0,
                            )
                        }),
                ),
                work,
            },
        );
        drop(running);
        // An earlier attempt that stopped (its host died) may have published under the key it
        // recorded: the run below publishes the only copy.
        if let Some(stale) = &job.pending_key
            && let Err(e) = self.block_on(self.videos.delete(stale))
        {
            tracing::warn!(request_id = %job.id, error = %e, "cannot remove an earlier attempt's video");
        }
        // A shutdown or a cancel may have come between the claim and the line above.
        let still_ours = !self.stopping.load(Ordering::SeqCst)
            && matches!(
                self.block_on(self.store.get(&job.id)),
                Ok(Some(j)) if j.state == super::JobState::Running && j.attempt == job.attempt
            );
        let outcome = if !still_ours {
            if self.stopping.load(Ordering::SeqCst) {
                self.requeue(&job)
            } else {
                Outcome::Cancelled
            }
        } else {
            tracing::info!(request_id = %job.id, attempt = job.attempt, "job started");
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.generate(pipeline, &job, &cancel, started)
            }));
            match run {
                Ok(outcome) => outcome,
                Err(_) => {
                    let error_id = new_error_id();
                    tracing::error!(request_id = %job.id, error_id, "generation panicked");
                    self.fail(&job, &format!("internal error (error id {error_id})"))
                }
            }
        };
        lock(&self.running).remove(&job.id);
        self.changed(&job.id);
        let seconds = started.elapsed().as_secs_f64();
        let label = match outcome {
            Outcome::Published => "succeeded",
            Outcome::Cancelled => "cancelled",
            Outcome::Requeued => "requeued",
            Outcome::Failed => "failed",
        };
        metrics::histogram!("wanserve_job_duration_seconds", "outcome" => label).record(seconds);
        metrics::counter!("wanserve_jobs_total", "outcome" => label).increment(1);
        if matches!(outcome, Outcome::Published) {
            lock(&self.timing).last_job_seconds = Some(seconds);
        }
        let peak_rss_mib = crate::peak_memory::peak_bytes().map(|b| b >> 20);
        let rss_mib = crate::peak_memory::resident_bytes().map(|b| b >> 20);
        tracing::info!(
            request_id = %job.id,
            outcome = label,
            seconds,
            peak_rss_mib,
            rss_mib,
            "job ended"
        );
    }

    fn requeue(&self, job: &Job) -> Outcome {
        if let Err(e) = self.block_on(self.store.requeue(&job.id, job.attempt)) {
            tracing::error!(request_id = %job.id, error = %e, "cannot put the job back in the queue");
        }
        Outcome::Requeued
    }

    /// Logs `error` with a fresh error id and fails the job with `what` and that id (the
    /// client sees the category and the id, never the error itself).
    fn fail_logged(
        &self,
        job: &Job,
        what: &str,
        context: &str,
        error: &dyn std::fmt::Display,
    ) -> Outcome {
        let error_id = new_error_id();
        tracing::error!(request_id = %job.id, error_id, error = %error, "{context}");
        self.fail(job, &format!("{what} (error id {error_id})"))
    }

    fn fail(&self, job: &Job, reason: &str) -> Outcome {
        if let Err(e) = self.block_on(self.store.fail(&job.id, job.attempt, reason)) {
            tracing::error!(request_id = %job.id, error = %e, "cannot record the failure");
        }
        Outcome::Failed
    }

    fn record_progress(&self, job: &Job, stage: Stage, step: usize, total: usize) {
        let now = Instant::now();
        {
            let mut running = lock(&self.running);
            let Some(r) = running.get_mut(&job.id) else {
                return;
            };
            if r.attempt != job.attempt {
                return;
            }
            if stage == Stage::Denoising
                && step > 0
                && let Some(last) = r.last_step.filter(|_| r.stage == Stage::Denoising)
            {
                let seconds = (now - last).as_secs_f64();
                metrics::histogram!("wanserve_step_duration_seconds").record(seconds);
                r.steps.record(step - 1, seconds);
                if step == total
                    && let Some(fraction) = r.steps.skip_fraction()
                {
                    lock(&self.timing).skip_fraction = Some(fraction);
                }
            }
            r.stage = stage;
            r.step = step;
            r.total = total;
            r.last_step = Some(now);
        }
        let stored = StoredProgress {
            stage: match stage {
                Stage::EncodingText => "encoding_text",
                Stage::Denoising => "denoising",
                Stage::Decoding => "decoding",
            }
            .into(),
            step: step as u32,
            total: total as u32,
            // Stored so that other hosts of a fleet can report it.
            eta_seconds: self
                .live_progress(&job.id)
                .and_then(|p| p.eta_seconds)
                .map(|s| (s * 10.0).round() / 10.0),
        };
        // The last recorded step is what a cancelled job reports; losing one on a store error
        // only makes progress stale.
        if let Err(e) = self.block_on(self.store.set_progress(&job.id, job.attempt, &stored)) {
            tracing::warn!(request_id = %job.id, error = %e, "cannot record progress");
        }
        self.changed(&job.id);
    }

    fn changed(&self, id: &str) {
        // No subscriber is the usual case, not an error.
        let _ = self.changes.send(Arc::from(id));
    }

    fn generate(
        &self,
        pipeline: &SharedPipeline,
        job: &Job,
        cancel: &CancelToken,
        started: Instant,
    ) -> Outcome {
        let request = job.request.generate_request();
        let temp = self
            .config
            .work_dir
            .join(format!("{}-{}.mp4", job.id, job.attempt));
        let settings = EncoderSettings {
            fps: pipeline.manifest().fps,
            ..EncoderSettings::default()
        };
        let mut writer = match Mp4Writer::create(&temp, request.width, request.height, &settings) {
            Ok(w) => w,
            Err(e) => {
                return self.fail_logged(
                    job,
                    "encoding the video failed",
                    "cannot start the encoder",
                    &e,
                );
            }
        };
        let mut decode_started = None;
        let generated = pipeline.generate(
            &request,
            cancel,
            &mut |p| {
                if p.stage == Stage::Decoding && p.step == 0 {
                    decode_started = Some(Instant::now());
                }
                self.record_progress(job, p.stage, p.step, p.total)
            },
            &mut |chunk: FrameChunk<'_>| {
                writer
                    .write_rgb(chunk.rgb, chunk.count)
                    .map_err(|e| e.to_string())
            },
        );
        match generated {
            Ok(_) => {}
            Err(PipelineError::Cancelled) => {
                return if self.stopping.load(Ordering::SeqCst) {
                    self.requeue(job)
                } else {
                    Outcome::Cancelled
                };
            }
            Err(e) => {
                let error_id = new_error_id();
                tracing::error!(request_id = %job.id, error_id, error = %e, "generation failed");
                return self.fail(job, &client_reason(&e, &error_id));
            }
        }
        let file = match writer.finish() {
            Ok(file) => file,
            Err(e) => {
                return self.fail_logged(
                    job,
                    "encoding the video failed",
                    "cannot finish the video",
                    &e,
                );
            }
        };
        if let Some(d) = decode_started {
            let per_unit = d.elapsed().as_secs_f64()
                / (request.width * request.height * request.num_frames).max(1) as f64;
            lock(&self.timing).decode_per_unit = Some(per_unit);
        }
        let outcome = self.publish(job, &file, started.elapsed().as_secs_f64());
        let _ = std::fs::remove_file(&file);
        outcome
    }

    /// Post-process policy, then one publish, then `running → succeeded` (fenced on the attempt).
    fn publish(&self, job: &Job, file: &std::path::Path, inference_seconds: f64) -> Outcome {
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
                tracing::warn!(request_id = %job.id, error = %e, "post-process plugin failed: default policy");
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
                    Ok(Some(j)) if j.state == super::JobState::Cancelled
                );
                if cancelled {
                    if let Err(e) = self.block_on(self.videos.delete(&key)) {
                        tracing::warn!(request_id = %job.id, error = %e, "cannot delete a cancelled job's video");
                    }
                } else {
                    tracing::warn!(request_id = %job.id, attempt = job.attempt, key, "lost the job to a later attempt while publishing; leaving the object to it");
                }
                Outcome::Cancelled
            }
            Err(e) => {
                let error_id = new_error_id();
                tracing::error!(request_id = %job.id, error_id, error = %e, "cannot record the finished job");
                Outcome::Failed
            }
        }
    }
}
