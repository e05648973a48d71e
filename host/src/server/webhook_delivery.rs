//! Sending webhooks: the loop that claims due deliveries from the job store, builds each body
//! from the job's status, posts it through [`super::webhooks::Webhooks`] and records the attempt.

use super::api::status_view;
use super::state::AppState;
use super::webhooks::{ATTEMPT_TIMEOUT, CONCURRENT};
use crate::ids::now_ms;
use crate::jobs::{WebhookAttempt, WebhookDelivery};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

/// The body: `{"type": "video.succeeded" | "video.failed" | "video.cancelled", "timestamp",
/// "data": <the job's status, as /video/status gives it>}`.
async fn payload(state: &AppState, delivery: &WebhookDelivery) -> Result<String, String> {
    let job = state
        .store
        .get(&delivery.job_id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("job {} is gone", delivery.job_id))?;
    let finished = job.finished_at.unwrap_or(delivery.created_at);
    let mut status = status_view(state, job)
        .await
        .map_err(|e| format!("cannot read the job's status: {e}"))?;
    status.webhook = None;
    let kind = match status.status {
        crate::wire::StatusName::Succeed => "video.succeeded",
        crate::wire::StatusName::Cancelled => "video.cancelled",
        _ => "video.failed",
    };
    let timestamp = chrono::DateTime::from_timestamp_millis(finished)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    serde_json::to_string(&serde_json::json!({
        "type": kind,
        "timestamp": timestamp,
        "data": status,
    }))
    .map_err(|e| e.to_string())
}

async fn deliver(state: &AppState, delivery: WebhookDelivery) {
    let webhooks = &state.webhooks;
    let body = match &delivery.payload {
        Some(body) => body.clone(),
        None => match payload(state, &delivery).await {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(request_id = %delivery.job_id, error = %e, "cannot build a webhook body");
                return; // the lease runs out and it is tried again
            }
        },
    };
    let result = webhooks.post(&delivery, &body).await;
    let now = now_ms();
    let attempt = match result {
        Ok(()) => WebhookAttempt::Delivered { at: now },
        Err(error) => webhooks.after_failure(&delivery, now, error),
    };
    match &attempt {
        WebhookAttempt::Delivered { .. } => {
            metrics::counter!("wanserve_webhooks_total", "outcome" => "delivered").increment(1);
            tracing::info!(request_id = %delivery.job_id, webhook_id = %delivery.id, attempt = delivery.attempts + 1, "webhook delivered");
        }
        WebhookAttempt::Retry { error, next_at, .. } => {
            metrics::counter!("wanserve_webhooks_total", "outcome" => "retry").increment(1);
            tracing::warn!(request_id = %delivery.job_id, webhook_id = %delivery.id, attempt = delivery.attempts + 1, error, retry_in_ms = next_at - now, "webhook not delivered; will retry");
        }
        WebhookAttempt::GaveUp { error, .. } => {
            metrics::counter!("wanserve_webhooks_total", "outcome" => "gave_up").increment(1);
            tracing::warn!(request_id = %delivery.job_id, webhook_id = %delivery.id, attempt = delivery.attempts + 1, error, "webhook not delivered; giving up");
        }
    }
    if let Err(e) = state
        .store
        .record_webhook_attempt(&delivery.id, &body, &attempt)
        .await
    {
        tracing::error!(webhook_id = %delivery.id, error = %e, "cannot record a webhook attempt");
    }
}

/// Sends due deliveries until shutdown: woken when a job changes, and every second (retries
/// fall due, and other hosts' jobs end).
pub async fn run(state: Arc<AppState>) {
    let mut changes = state.workers.changes();
    let mut shutting_down = state.shutting_down.clone();
    let lease = ATTEMPT_TIMEOUT + Duration::from_secs(20);
    loop {
        let now = now_ms();
        match state
            .store
            .claim_due_webhooks(now, now + lease.as_millis() as i64, 64)
            .await
        {
            Ok(due) if !due.is_empty() => {
                futures::stream::iter(due)
                    .for_each_concurrent(CONCURRENT, |delivery| deliver(&state, delivery))
                    .await;
                continue;
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cannot read due webhooks"),
        }
        tokio::select! {
            _ = tokio::time::timeout(Duration::from_secs(1), changes.recv()) => {}
            _ = shutting_down.wait_for(|stopping| *stopping) => return,
        }
    }
}
