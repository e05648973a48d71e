//! The job workers: `slots` dedicated OS threads (generation blocks for seconds to minutes, and
//! the ffmpeg writer is not `Send`), each claiming the oldest queued job from the store and
//! rendering it through the one shared [`Renderer`]. Never on the async runtime: the workers
//! only `block_on` the store's short queries.
//!
//! - `claim.rs`: the loop each thread runs (wait, claim, run);
//! - `run.rs`: one job from claim to its final state (render, failure reasons, panics);
//! - `progress.rs`: the running jobs' live progress and ETA, and what finished jobs taught;
//! - `leases.rs`: lease renewal and cancels from other hosts (a shared store);
//! - `publish.rs`: post-process policy, publish, `running → succeeded`.
//!
//! Cancel: the store marks the job cancelled at once (durable); the worker's [`CancelToken`] is
//! set and the pipeline stops before its next step, and the worker takes the next job.
//! Shutdown: every running job is stopped the same way and put back in the queue.
//!
//! [`CancelToken`]: crate::pipeline::CancelToken

mod claim;
mod leases;
mod progress;
mod publish;
mod run;
#[cfg(test)]
mod tests;

pub use progress::LiveProgress;

use super::JobStore;
use crate::engine::Renderers;
use crate::plugins::PluginHost;
use crate::storage::VideoStore;
use crate::sync::lock;
use progress::RunningJobs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Jobs running at once (0 on an API-only host).
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

/// What the worker threads and the lease keeper share.
struct Shared {
    store: Arc<dyn JobStore>,
    videos: Arc<VideoStore>,
    plugins: Arc<PluginHost>,
    renderers: OnceLock<Renderers>,
    runtime: tokio::runtime::Handle,
    config: WorkerConfig,
    /// Bumped on every wake-up; workers wait for it to change.
    wake: Mutex<u64>,
    woken: Condvar,
    jobs: RunningJobs,
    stopping: AtomicBool,
    /// The id of a job whose state or progress just changed (for live progress streams).
    changes: tokio::sync::broadcast::Sender<Arc<str>>,
}

pub struct Workers {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Workers {
    /// Starts the workers; they wait until [`Workers::set_renderers`] hands them the models.
    pub fn start(
        store: Arc<dyn JobStore>,
        videos: Arc<VideoStore>,
        plugins: Arc<PluginHost>,
        runtime: tokio::runtime::Handle,
        config: WorkerConfig,
    ) -> std::io::Result<Arc<Self>> {
        std::fs::create_dir_all(&config.work_dir)?;
        // Leftovers of attempts that died: their jobs are back in the queue.
        for entry in std::fs::read_dir(&config.work_dir)?.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        let slots = config.slots;
        let renewal = config.lease_renewal;
        let shared = Arc::new(Shared {
            store,
            videos,
            plugins,
            renderers: OnceLock::new(),
            runtime,
            config,
            wake: Mutex::new(0),
            woken: Condvar::new(),
            jobs: RunningJobs::default(),
            stopping: AtomicBool::new(false),
            // Subscribers re-read the job on each id; one that falls this far behind re-reads
            // it once (a lagged receiver), so the bound only limits memory.
            changes: tokio::sync::broadcast::channel(256).0,
        });
        shared.runtime.spawn(shared.clone().keep_leases(renewal));
        let mut threads = Vec::with_capacity(slots);
        for slot in 0..slots {
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("wanserve-slot-{slot}"))
                    .spawn(move || shared.work())?,
            );
        }
        Ok(Arc::new(Self {
            shared,
            threads: Mutex::new(threads),
        }))
    }

    /// Hands the loaded models to the workers; they start claiming jobs.
    pub fn set_renderers(&self, renderers: Renderers) {
        let _ = self.shared.renderers.set(renderers);
        self.wake_all();
    }

    /// A job was queued: one idle worker looks at the queue now.
    pub fn wake(&self) {
        self.shared.wake_one();
    }

    fn wake_all(&self) {
        *lock(&self.shared.wake) += 1;
        self.shared.woken.notify_all();
    }

    /// Stops `id` at its next step if this process runs it (the store already says cancelled).
    pub fn cancel_running(&self, id: &str) -> bool {
        self.shared.jobs.cancel(id)
    }

    /// Jobs this process runs now.
    pub fn running(&self) -> usize {
        self.shared.jobs.len()
    }

    /// Ids of jobs whose state or progress changed in this process, as they change.
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.shared.changes.subscribe()
    }

    /// Tells [`Workers::changes`] subscribers that `id` changed outside the workers (a cancel
    /// of a queued job).
    pub fn changed(&self, id: &str) {
        self.shared.changed(id);
    }

    /// Progress of `id` if this process runs it.
    pub fn progress(&self, id: &str) -> Option<LiveProgress> {
        self.shared.jobs.live(id)
    }

    /// Seconds a client could wait before a slot is likely free (for `Retry-After`).
    pub fn retry_after_seconds(&self) -> u64 {
        self.shared
            .jobs
            .retry_after_seconds(self.shared.config.slots)
    }

    /// Stops claiming, stops running jobs at their next step and puts them back in the queue,
    /// then waits for the workers. Blocking: call it off the async runtime.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.jobs.cancel_all();
        self.wake_all();
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn wake_one(&self) {
        *lock(&self.wake) += 1;
        self.woken.notify_one();
    }

    fn changed(&self, id: &str) {
        // No subscriber is the usual case, not an error.
        let _ = self.changes.send(Arc::from(id));
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }
}
