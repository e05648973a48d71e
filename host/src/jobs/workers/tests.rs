//! The workers on their own: a real SQLite job store and a local object store, the real
//! pipeline loop over a fake backend (no ONNX), and frames written raw instead of through
//! ffmpeg. Each test drives what a user would see: the job's final state, its reason, whether
//! a video was published, and whether the worker goes on to the next job.

use super::{WorkerConfig, Workers};
use crate::backend::BackendError;
use crate::backend::fake::{FakeBackend, FakeCall, FakeHook, FakeRun};
use crate::engine::{Engine, Renderers};
use crate::ids::new_request_id;
use crate::jobs::sqlite::SqliteJobStore;
use crate::jobs::*;
use crate::model::{ModelDir, bundled_model_dir};
use crate::pipeline::Pipeline;
use crate::plugins::{PluginHost, PluginLimits};
use crate::storage::VideoStore;
use crate::video::{EncodeError, FrameWriter, VideoEncoder};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WIDTH: u32 = 32;
const HEIGHT: u32 = 32;
const FRAMES: u32 = 5;
const PRINCIPAL: &str = "tester";

/// Frames as raw RGB: the file is exactly what the pipeline decoded.
struct RawFrames {
    /// Called on finish, before the file takes its final name.
    on_finish: Arc<dyn Fn() + Send + Sync>,
    fail_on_write: Arc<AtomicBool>,
}

struct RawWriter {
    partial: PathBuf,
    target: PathBuf,
    bytes: Vec<u8>,
    on_finish: Arc<dyn Fn() + Send + Sync>,
    fail_on_write: Arc<AtomicBool>,
}

impl VideoEncoder for RawFrames {
    fn create(
        &self,
        target: &Path,
        _width: usize,
        _height: usize,
        _fps: u32,
    ) -> Result<Box<dyn FrameWriter>, EncodeError> {
        Ok(Box::new(RawWriter {
            partial: target.with_extension("partial"),
            target: target.to_path_buf(),
            bytes: Vec::new(),
            on_finish: self.on_finish.clone(),
            fail_on_write: self.fail_on_write.clone(),
        }))
    }
}

impl FrameWriter for RawWriter {
    fn write_rgb(&mut self, rgb: &[u8], count: usize) -> Result<(), EncodeError> {
        if self.fail_on_write.load(Ordering::SeqCst) {
            return Err(EncodeError::BadFrameData {
                got: rgb.len(),
                count,
                width: 0,
                height: 0,
            });
        }
        self.bytes.extend_from_slice(rgb);
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<PathBuf, EncodeError> {
        (self.on_finish)();
        let rename = |source| EncodeError::Rename {
            from: self.partial.clone(),
            to: self.target.clone(),
            source,
        };
        std::fs::write(&self.partial, &self.bytes).map_err(rename)?;
        std::fs::rename(&self.partial, &self.target).map_err(rename)?;
        Ok(self.target.clone())
    }
}

/// The SQLite store, with methods that can be made to fail and leases that can be lost (what a
/// shared store reports when another host took the job over).
struct ScriptedStore {
    inner: SqliteJobStore,
    failing: Mutex<HashSet<&'static str>>,
    leases: AtomicBool,
}

impl ScriptedStore {
    fn check(&self, method: &'static str) -> Result<(), StoreError> {
        if self
            .failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(method)
        {
            return Err(StoreError::Open {
                path: "scripted".into(),
                reason: format!("{method} fails"),
            });
        }
        Ok(())
    }

    fn fail(&self, method: &'static str, failing: bool) {
        let mut set = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        if failing {
            set.insert(method);
        } else {
            set.remove(method);
        }
    }
}

#[async_trait::async_trait]
impl JobStore for ScriptedStore {
    async fn submit(&self, job: NewJob, limit: u64) -> Result<Submitted, StoreError> {
        self.inner.submit(job, limit).await
    }
    async fn get(&self, id: &str) -> Result<Option<Arc<Job>>, StoreError> {
        self.inner.get(id).await
    }
    async fn jobs_ahead(&self, seq: i64) -> Result<u64, StoreError> {
        self.inner.jobs_ahead(seq).await
    }
    async fn counts(&self) -> Result<Counts, StoreError> {
        self.inner.counts().await
    }
    async fn counts_of(&self, principal: &str) -> Result<Counts, StoreError> {
        self.inner.counts_of(principal).await
    }
    async fn cancel(&self, id: &str, principal: &str) -> Result<CancelOutcome, StoreError> {
        self.inner.cancel(id, principal).await
    }
    async fn claim_next(&self, models: &[String]) -> Result<Option<Job>, StoreError> {
        self.check("claim_next")?;
        self.inner.claim_next(models).await
    }
    async fn renew_leases(&self, held: &[(String, i64)]) -> Result<Vec<String>, StoreError> {
        if !self.leases.load(Ordering::SeqCst) {
            return Ok(Vec::new());
        }
        // As a shared store answers: a job held as an attempt that no longer runs is lost.
        let mut lost = Vec::new();
        for (id, attempt) in held {
            let current = self.inner.get(id).await?;
            if !matches!(current, Some(j) if j.state == JobState::Running && j.attempt == *attempt)
            {
                lost.push(id.clone());
            }
        }
        Ok(lost)
    }
    async fn set_progress(
        &self,
        id: &str,
        attempt: i64,
        progress: &StoredProgress,
    ) -> Result<(), StoreError> {
        self.check("set_progress")?;
        self.inner.set_progress(id, attempt, progress).await
    }
    async fn set_preview(
        &self,
        id: &str,
        attempt: i64,
        preview: &StoredPreview,
    ) -> Result<(), StoreError> {
        self.check("set_preview")?;
        self.inner.set_preview(id, attempt, preview).await
    }
    async fn clear_preview(&self, id: &str, attempt: i64) -> Result<(), StoreError> {
        self.inner.clear_preview(id, attempt).await
    }
    async fn preview(&self, id: &str) -> Result<Option<StoredPreview>, StoreError> {
        self.inner.preview(id).await
    }
    async fn set_pending_key(&self, id: &str, attempt: i64, key: &str) -> Result<bool, StoreError> {
        self.check("set_pending_key")?;
        self.inner.set_pending_key(id, attempt, key).await
    }
    async fn complete(
        &self,
        id: &str,
        attempt: i64,
        done: &Completion,
    ) -> Result<bool, StoreError> {
        self.check("complete")?;
        self.inner.complete(id, attempt, done).await
    }
    async fn fail(&self, id: &str, attempt: i64, reason: &str) -> Result<bool, StoreError> {
        self.inner.fail(id, attempt, reason).await
    }
    async fn requeue(&self, id: &str, attempt: i64) -> Result<bool, StoreError> {
        self.inner.requeue(id, attempt).await
    }
    async fn recover(&self) -> Result<Vec<Job>, StoreError> {
        self.inner.recover().await
    }
    async fn expired_videos(
        &self,
        now: i64,
        kept: i64,
        limit: u32,
    ) -> Result<Vec<Job>, StoreError> {
        self.inner.expired_videos(now, kept, limit).await
    }
    async fn mark_video_deleted(&self, id: &str, at: i64) -> Result<(), StoreError> {
        self.inner.mark_video_deleted(id, at).await
    }
    async fn mark_video_kept(&self, id: &str, at: i64) -> Result<(), StoreError> {
        self.inner.mark_video_kept(id, at).await
    }
    async fn prune_idempotency_keys(&self, now: i64) -> Result<u64, StoreError> {
        self.inner.prune_idempotency_keys(now).await
    }
    async fn claim_due_webhooks(
        &self,
        now: i64,
        until: i64,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>, StoreError> {
        self.inner.claim_due_webhooks(now, until, limit).await
    }
    async fn record_webhook_attempt(
        &self,
        id: &str,
        payload: &str,
        attempt: &WebhookAttempt,
    ) -> Result<(), StoreError> {
        self.inner
            .record_webhook_attempt(id, payload, attempt)
            .await
    }
    async fn webhook_delivery(&self, id: &str) -> Result<Option<WebhookDelivery>, StoreError> {
        self.inner.webhook_delivery(id).await
    }
}

/// What a test's backend does: `on_call` decides each call (after counting it).
struct Script {
    calls: AtomicUsize,
    on_call: Box<FakeHook>,
}

struct Harness {
    _dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    store: Arc<ScriptedStore>,
    videos: Arc<VideoStore>,
    workers: Arc<Workers>,
    work_dir: PathBuf,
    encoder_fails: Arc<AtomicBool>,
}

fn carry_on() -> Box<FakeHook> {
    Box::new(|_, _| Ok(()))
}

impl Harness {
    /// Workers over a fresh store with `on_call` in the backend and `on_finish` in the encoder.
    fn start(on_call: Box<FakeHook>, on_finish: Arc<dyn Fn() + Send + Sync>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let inner = runtime
            .block_on(SqliteJobStore::open(&dir.path().join("jobs.db")))
            .expect("job store");
        let store = Arc::new(ScriptedStore {
            inner,
            failing: Mutex::default(),
            leases: AtomicBool::new(false),
        });
        let videos = Arc::new(
            VideoStore::open(
                None,
                dir.path(),
                "http://127.0.0.1:1",
                Duration::from_millis(10),
            )
            .expect("video store"),
        );
        let plugins = Arc::new(PluginHost::new(PluginLimits::default()).expect("plugin host"));
        let work_dir = dir.path().join("work");
        let workers = Workers::start(
            store.clone(),
            videos.clone(),
            plugins,
            runtime.handle().clone(),
            WorkerConfig {
                slots: 1,
                work_dir: work_dir.clone(),
                default_retention: Duration::from_secs(3600),
                idle_poll: Duration::from_millis(20),
                lease_renewal: Duration::from_millis(20),
            },
        )
        .expect("workers");
        let model = ModelDir::open(&bundled_model_dir()).expect("bundled model");
        let script = Arc::new(Script {
            calls: AtomicUsize::new(0),
            on_call,
        });
        let hook: Box<FakeHook> = Box::new(move |call, run| {
            script.calls.fetch_add(1, Ordering::SeqCst);
            (script.on_call)(call, run)
        });
        let pipeline =
            Pipeline::new(FakeBackend::like(&model.manifest, hook), &model).expect("pipeline");
        let encoder_fails = Arc::new(AtomicBool::new(false));
        workers.set_renderers(Renderers::one(
            crate::wire::DEFAULT_MODEL,
            Arc::new(Engine {
                pipeline,
                encoder: Box::new(RawFrames {
                    on_finish,
                    fail_on_write: encoder_fails.clone(),
                }),
            }),
        ));
        Self {
            _dir: dir,
            runtime,
            store,
            videos,
            workers,
            work_dir,
            encoder_fails,
        }
    }

    fn submit(&self, prompt: &str) -> String {
        self.submit_for(crate::wire::DEFAULT_MODEL, prompt)
    }

    fn submit_for(&self, model: &str, prompt: &str) -> String {
        let id = new_request_id();
        let job = NewJob {
            id: id.clone(),
            principal: JobPrincipal {
                id: PRINCIPAL.into(),
                display_name: PRINCIPAL.into(),
                attributes: Vec::new(),
            },
            request: JobRequest {
                model: model.into(),
                prompt: prompt.into(),
                negative_prompt: String::new(),
                width: WIDTH,
                height: HEIGHT,
                num_frames: FRAMES,
                guidance_scale: 5.0,
                infer_steps: 3,
                seed: 7,
                cache: Default::default(),
            },
            idempotency: None,
            webhook_url: None,
        };
        let submitted = self.runtime.block_on(self.store.submit(job, 100));
        assert!(
            matches!(submitted, Ok(Submitted::Created(_))),
            "{submitted:?}"
        );
        self.workers.wake();
        id
    }

    fn job(&self, id: &str) -> Arc<Job> {
        self.runtime
            .block_on(self.store.get(id))
            .expect("store read")
            .expect("the job exists")
    }

    /// Waits (up to 20 s) for `id` to reach a final state, and for its worker to let it go.
    fn finished(&self, id: &str) -> Arc<Job> {
        wait_until("the job ends", || {
            self.job(id).state.is_final() && self.workers.progress(id).is_none()
        });
        self.job(id)
    }

    fn published(&self, key: &str) -> bool {
        self.runtime
            .block_on(self.videos.exists(key))
            .expect("object store read")
    }

    fn work_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.work_dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// The client's cancel: the store first, then the running job's token (as `api.rs` does).
    fn cancel(&self, id: &str) {
        let outcome = self
            .runtime
            .block_on(self.store.cancel(id, PRINCIPAL))
            .expect("cancel");
        assert!(
            matches!(outcome, CancelOutcome::StopRequested),
            "{id}: {outcome:?}"
        );
        self.workers.cancel_running(id);
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.workers.shutdown();
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A hook that, on the first call of `stage`, says so on `reached` and blocks until the run is
/// interrupted.
fn block_at(stage: FakeCall) -> (Box<FakeHook>, std::sync::mpsc::Receiver<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = Mutex::new(Some(tx));
    let hook: Box<FakeHook> = Box::new(move |call, run: &FakeRun| {
        if call == stage
            && let Some(tx) = tx.lock().unwrap_or_else(|p| p.into_inner()).take()
        {
            let _ = tx.send(());
            return run.wait_for_interrupt(Duration::from_secs(20));
        }
        Ok(())
    });
    (hook, rx)
}

fn no_finish_hook() -> Arc<dyn Fn() + Send + Sync> {
    Arc::new(|| {})
}

#[test]
fn claimed_jobs_run_in_order_and_each_publishes_what_was_decoded() {
    let h = Harness::start(carry_on(), no_finish_hook());
    let first = h.submit("the first job in the queue");
    let second = h.submit("the second job in the queue");
    let (a, b) = (h.finished(&first), h.finished(&second));
    for job in [&a, &b] {
        assert_eq!(job.state, JobState::Succeeded, "{:?}", job.reason);
        assert_eq!(job.attempt, 1);
        let key = job.object_key.as_deref().expect("a video key");
        assert_eq!(key, format!("{}.mp4", job.id), "the host's default key");
        assert!(h.published(key));
        let progress = job.progress.as_ref().expect("progress recorded");
        assert_eq!(progress.stage, "decoding");
        assert_eq!(progress.step, progress.total);
    }
    assert!(
        a.started_at <= b.started_at,
        "the older job is claimed first"
    );
    let video = h.dir_file(a.object_key.as_deref().expect("key"));
    assert_eq!(
        std::fs::metadata(video).expect("published file").len(),
        u64::from(WIDTH * HEIGHT * 3 * FRAMES),
        "the object is every decoded frame (and no extra frame)"
    );
    assert!(h.work_files().is_empty(), "{:?}", h.work_files());
}

impl Harness {
    /// Where the local object store keeps `key`.
    fn dir_file(&self, key: &str) -> PathBuf {
        self._dir.path().join("videos").join(key)
    }
}

/// A job for a model this host does not serve (a fleet given different `--model` lists) fails
/// saying which, publishes nothing, and the worker goes on to the next.
#[test]
fn a_job_for_a_model_not_served_here_fails_naming_it_and_the_next_runs() {
    let h = Harness::start(carry_on(), no_finish_hook());
    let stray = h.submit_for("tiny-other", "a job for another model");
    let next = h.submit("the job after it");
    let stray = h.finished(&stray);
    assert_eq!(stray.state, JobState::Failed);
    assert_eq!(
        stray.reason.as_deref(),
        Some("this server does not serve model \"tiny-other\"")
    );
    assert!(stray.object_key.is_none());
    assert_eq!(h.finished(&next).state, JobState::Succeeded);
}

#[test]
fn a_cancel_at_each_stage_ends_the_job_cancelled_with_no_video_and_frees_the_worker() {
    for stage in [FakeCall::EncodeText, FakeCall::Predict, FakeCall::Decode] {
        let (hook, reached) = block_at(stage);
        let h = Harness::start(hook, no_finish_hook());
        let id = h.submit("a job cancelled while it runs");
        reached
            .recv_timeout(Duration::from_secs(20))
            .expect("the job reaches the stage");
        h.cancel(&id);
        let job = h.finished(&id);
        assert_eq!(job.state, JobState::Cancelled, "{stage:?}");
        assert!(!h.published(&format!("{id}.mp4")), "{stage:?}");
        assert!(h.work_files().is_empty(), "{stage:?}: {:?}", h.work_files());
        let next = h.submit("the job after the cancelled one");
        assert_eq!(h.finished(&next).state, JobState::Succeeded, "{stage:?}");
    }
}

#[test]
fn a_cancel_while_publishing_leaves_no_video() {
    // The cancel lands after the last frame, before the video is stored.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let tx = Mutex::new(tx);
    let go_rx = Mutex::new(go_rx);
    let h = Harness::start(
        carry_on(),
        Arc::new(move || {
            let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(());
            let _ = go_rx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .recv_timeout(Duration::from_secs(20));
        }),
    );
    let id = h.submit("a job cancelled as it finishes");
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the job finishes rendering");
    h.cancel(&id);
    go_tx.send(()).expect("the encoder waits");
    let job = h.finished(&id);
    assert_eq!(job.state, JobState::Cancelled);
    assert!(!h.published(&format!("{id}.mp4")));
}

#[test]
fn a_failing_store_fails_the_job_with_an_error_id_and_the_worker_goes_on() {
    let h = Harness::start(carry_on(), no_finish_hook());
    h.store.fail("set_pending_key", true);
    let id = h.submit("a job whose store fails");
    let job = h.finished(&id);
    assert_eq!(job.state, JobState::Failed);
    let reason = job.reason.as_deref().unwrap_or_default();
    assert!(
        reason.starts_with("storing the video failed (error id "),
        "{reason}"
    );
    assert!(
        !reason.contains("scripted"),
        "the store's own message stays in the log"
    );
    assert!(!h.published(&format!("{id}.mp4")));
    h.store.fail("set_pending_key", false);

    // Claims that fail leave the job queued; it runs once they work again.
    h.store.fail("claim_next", true);
    let later = h.submit("a job queued while claims fail");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(h.job(&later).state, JobState::Queued);
    h.store.fail("claim_next", false);
    assert_eq!(h.finished(&later).state, JobState::Succeeded);

    // Progress that cannot be stored only makes progress stale.
    h.store.fail("set_progress", true);
    let stale = h.submit("a job whose progress is not stored");
    assert_eq!(h.finished(&stale).state, JobState::Succeeded);
}

#[test]
fn a_lost_lease_stops_the_job_and_leaves_it_to_the_attempt_that_took_it() {
    let (hook, reached) = block_at(FakeCall::Predict);
    let h = Harness::start(hook, no_finish_hook());
    h.store.leases.store(true, Ordering::SeqCst);
    let id = h.submit("a job another host takes over");
    reached
        .recv_timeout(Duration::from_secs(20))
        .expect("the job runs");
    // Another host's view: the lease ran out, the job went back and was claimed again.
    let taken = h.runtime.block_on(async {
        h.store.inner.requeue(&id, 1).await.expect("requeue");
        h.store.inner.claim_next(&[]).await.expect("claim")
    });
    assert_eq!(taken.as_ref().map(|j| j.attempt), Some(2));
    wait_until("the worker lets the job go", || h.workers.running() == 0);
    let job = h.job(&id);
    assert_eq!(
        (job.state, job.attempt),
        (JobState::Running, 2),
        "the lost attempt changes nothing of the new one's"
    );
    assert!(!h.published(&format!("{id}.mp4")));
}

#[test]
fn a_panic_in_a_job_fails_it_as_internal_and_the_worker_takes_the_next() {
    let panicked = Arc::new(AtomicBool::new(false));
    let once = panicked.clone();
    let h = Harness::start(
        Box::new(move |call, _| {
            if call == FakeCall::Predict && !once.swap(true, Ordering::SeqCst) {
                panic!("a bug in a graph wrapper");
            }
            Ok(())
        }),
        no_finish_hook(),
    );
    let id = h.submit("a job that panics");
    let job = h.finished(&id);
    assert_eq!(job.state, JobState::Failed);
    let reason = job.reason.as_deref().unwrap_or_default();
    assert!(reason.starts_with("internal error (error id "), "{reason}");
    assert!(panicked.load(Ordering::SeqCst));
    let next = h.submit("the job after the panic");
    assert_eq!(h.finished(&next).state, JobState::Succeeded);
}

#[test]
fn clients_are_told_what_failed_by_category_never_the_runtime_message() {
    let h = Harness::start(
        Box::new(|call, _| match call {
            FakeCall::Decode => Err(BackendError::OutOfMemory {
                graph: "vae",
                reason: "Failed to allocate memory for requested buffer of size 1 GiB".into(),
            }),
            _ => Ok(()),
        }),
        no_finish_hook(),
    );
    let oom = h.finished(&h.submit("a job that runs out of memory"));
    let reason = oom.reason.as_deref().unwrap_or_default();
    assert!(reason.starts_with("out of memory (error id "), "{reason}");
    assert!(!reason.contains("allocate"), "{reason}");

    let h = Harness::start(carry_on(), no_finish_hook());
    h.encoder_fails.store(true, Ordering::SeqCst);
    let bad = h.finished(&h.submit("a job whose encoder fails"));
    let reason = bad.reason.as_deref().unwrap_or_default();
    assert!(
        reason.starts_with("encoding the video failed (error id "),
        "{reason}"
    );
    assert!(h.work_files().is_empty(), "{:?}", h.work_files());
}

#[test]
fn shutdown_puts_the_running_job_back_in_the_queue() {
    let (hook, reached) = block_at(FakeCall::Predict);
    let h = Harness::start(hook, no_finish_hook());
    let id = h.submit("a job running at shutdown");
    reached
        .recv_timeout(Duration::from_secs(20))
        .expect("the job runs");
    h.workers.shutdown();
    let job = h.job(&id);
    assert_eq!(job.state, JobState::Queued, "{:?}", job.reason);
    assert!(h.workers.progress(&id).is_none());
}
