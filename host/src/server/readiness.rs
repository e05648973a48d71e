//! Whether the object store takes writes, as `/ready` reports it: checked by one task every
//! [`PROBE_EVERY`], never by the probes themselves. A probe per request raced other probes on
//! the same object (a healthy server answered 503) and cost a paid PUT and DELETE on S3 each.

use crate::storage::VideoStore;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

/// How often the store is written to. With [`PROBE_TIMEOUT`], a store that stops taking writes
/// turns `/ready` to 503 within 10 s; on S3 this costs one PUT and one DELETE per interval.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);
/// A write that takes longer than this counts as failed (a hung store is not ready).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

// 0: not yet probed.
const WRITABLE: u8 = 1;
const FAILING: u8 = 2;

/// The last probe's result; unknown (not ready) until the first one ends.
#[derive(Default)]
pub struct StoreReadiness(AtomicU8);

impl StoreReadiness {
    pub fn writable(&self) -> bool {
        self.0.load(Ordering::Relaxed) == WRITABLE
    }

    /// Starts the probing task; the first probe runs at once.
    pub fn start(videos: Arc<VideoStore>) -> Arc<Self> {
        let readiness = Arc::new(Self::default());
        let kept = readiness.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROBE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let result =
                    match tokio::time::timeout(PROBE_TIMEOUT, videos.probe_writable()).await {
                        Ok(written) => written.map_err(|e| e.to_string()),
                        Err(_) => Err(format!("no answer in {} s", PROBE_TIMEOUT.as_secs())),
                    };
                let now = if result.is_ok() { WRITABLE } else { FAILING };
                let before = kept.0.swap(now, Ordering::Relaxed);
                // Changes only: a store down for an hour logs once.
                match result {
                    Err(e) if before != FAILING => {
                        tracing::warn!(error = %e, "object store is not writable; /ready says 503")
                    }
                    Ok(()) if before == FAILING => tracing::info!("object store is writable again"),
                    _ => {}
                }
            }
        });
        readiness
    }
}
