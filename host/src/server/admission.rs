//! Fairness between callers: before a job is queued or a progress stream opens, the validate
//! plugin's `admission` weighs what the caller has going (its queued and running jobs from the
//! job store, its streams open on this host) and may refuse for now (429 + `Retry-After`).
//!
//! The host keeps the numbers honest: one caller's admissions on this host run one at a time
//! (a lock stripe per principal), so a burst of concurrent submits cannot all read the same
//! count and all pass. Across a fleet's hosts the count is the database's, read without a lock,
//! so concurrent submits on different hosts can pass a limit by at most one each.

use super::admission_locks::OpenStream;
use super::error::ApiError;
use super::state::AppState;
use crate::plugins::{AdmissionAction, Principal, Slot, Usage};

/// Holds a caller's admission lock: submit the job (or count the stream) before dropping it.
pub struct Admitted<'a> {
    _stripe: tokio::sync::MutexGuard<'a, ()>,
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
        state.admission.open_stream(principal_id)
    }
}

fn saturate(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
