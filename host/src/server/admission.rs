//! Fairness between callers: before a job is queued or a progress stream opens, the validate
//! plugin's `admission` weighs what the caller has going (its queued and running jobs from the
//! job store, its streams open on this host) and may refuse for now (429 + `Retry-After`).
//!
//! The host keeps the numbers honest: one caller's admissions on this host run one at a time
//! (a lock stripe per principal), so a burst of concurrent submits cannot all read the same
//! count and all pass. Across a fleet's hosts the count is the database's, read without a lock,
//! so concurrent submits on different hosts can pass a limit by at most one each.

use super::AppState;
use super::error::ApiError;
use crate::plugins::{AdmissionAction, Principal, Slot, Usage};
use crate::sync::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Lock stripes: enough that unrelated callers rarely share one, few enough to stay small.
const STRIPES: usize = 64;

pub struct Admission {
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// Streams open on this host, per principal id (entries removed at zero).
    streams: Arc<Mutex<HashMap<String, u32>>>,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            streams: Arc::default(),
        }
    }
}

/// Holds a caller's admission lock: submit the job (or count the stream) before dropping it.
pub struct Admitted<'a> {
    _stripe: tokio::sync::MutexGuard<'a, ()>,
}

/// One open stream, counted against its caller until dropped.
pub struct OpenStream {
    streams: Arc<Mutex<HashMap<String, u32>>>,
    principal_id: String,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        metrics::gauge!("wanserve_event_streams_open").decrement(1.0);
        let mut streams = lock(&self.streams);
        if let Some(open) = streams.get_mut(&self.principal_id) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                streams.remove(&self.principal_id);
            }
        }
    }
}

impl Admission {
    fn stripe(&self, principal_id: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(principal_id);
        &self.stripes[(hash % STRIPES as u64) as usize]
    }

    /// Streams `principal_id` has open on this host.
    pub fn streams_open(&self, principal_id: &str) -> u32 {
        lock(&self.streams).get(principal_id).copied().unwrap_or(0)
    }
}

/// Asks the validate plugin whether `caller` may `action` now; on `Ok`, the returned guard
/// keeps the caller's other admissions on this host waiting until the job is stored (drop it
/// after `submit`) or the stream counted.
pub async fn admit<'a>(
    state: &'a AppState,
    caller: &Principal,
    action: AdmissionAction,
) -> Result<Admitted<'a>, ApiError> {
    let stripe = state.admission.stripe(&caller.id).lock().await;
    let (mine, all) = tokio::try_join!(state.store.counts_of(&caller.id), state.store.counts())
        .map_err(ApiError::internal)?;
    let usage = Usage {
        jobs_queued: saturate(mine.queued),
        jobs_running: saturate(mine.running),
        streams_open: state.admission.streams_open(&caller.id),
        queue_total: saturate(all.queued),
        queue_limit: saturate(state.queue_limit),
    };
    let plugins = state.plugins.clone();
    let who = caller.clone();
    let verdict = state
        .plugin_calls
        .run(move || plugins.admit(&who, usage, action))
        .await
        .map_err(ApiError::internal)?;
    let action_label = match action {
        AdmissionAction::Submit => "submit",
        AdmissionAction::OpenStream => "open_stream",
    };
    match verdict {
        Ok(Ok(())) => Ok(Admitted { _stripe: stripe }),
        Ok(Err(busy)) => {
            metrics::counter!("wanserve_admission_refused_total", "action" => action_label)
                .increment(1);
            tracing::info!(principal = %caller.id, action = action_label, reason = %busy.reason, "admission refused");
            let retry_after = busy
                .retry_after_seconds
                .map(u64::from)
                .unwrap_or_else(|| state.workers.retry_after_seconds())
                .clamp(1, 3600);
            Err(ApiError::CallerBusy {
                reason: busy.reason,
                retry_after,
            })
        }
        Err(e) => Err(ApiError::plugin_failed(Slot::Validate, &e)),
    }
}

impl Admitted<'_> {
    /// Counts a stream `principal_id` opens (while the admission lock is still held).
    pub fn open_stream(self, state: &AppState, principal_id: &str) -> OpenStream {
        *lock(&state.admission.streams)
            .entry(principal_id.to_string())
            .or_insert(0) += 1;
        metrics::gauge!("wanserve_event_streams_open").increment(1.0);
        OpenStream {
            streams: state.admission.streams.clone(),
            principal_id: principal_id.to_string(),
        }
    }
}

fn saturate(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
