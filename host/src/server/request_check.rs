//! The one place a submit is checked: the host's own fields, the validate plugin, this server's
//! limits and what the model can run.

use super::error::{ApiError, FieldProblem};
use super::state::{AppState, HostLimits};
use crate::jobs::JobRequest;
use crate::pipeline::step_cache::CacheMode;
use crate::plugins::{Principal, Slot};

impl HostLimits {
    /// 422 for a job too large for this server or one the model cannot run.
    pub fn check(&self, r: &JobRequest) -> Result<(), ApiError> {
        let mut fields = Vec::new();
        let pixel_frames = u64::from(r.width)
            .checked_mul(u64::from(r.height))
            .and_then(|p| p.checked_mul(u64::from(r.num_frames)));
        match pixel_frames {
            Some(n) if n <= self.max_pixel_frames => {}
            _ => {
                let reason = format!(
                    "width × height × frames ({} × {} × {}) exceeds this server's limit of {}",
                    r.width, r.height, r.num_frames, self.max_pixel_frames
                );
                fields.push(FieldProblem {
                    field: "image_size".into(),
                    reason: reason.clone(),
                });
                fields.push(FieldProblem {
                    field: "num_frames".into(),
                    reason,
                });
            }
        }
        if r.infer_steps > self.max_steps {
            fields.push(FieldProblem {
                field: "infer_steps".into(),
                reason: format!(
                    "{} exceeds this server's limit of {}",
                    r.infer_steps, self.max_steps
                ),
            });
        }
        // A validate plugin may accept any name: the job must still name a model served here.
        let Some(model) = self.models.get(&r.model) else {
            let names = self.models.names().join(", ");
            fields.push(FieldProblem {
                field: "model".into(),
                reason: format!(
                    "this server serves no model {:?} (it serves {names})",
                    r.model
                ),
            });
            return Err(ApiError::invalid(fields));
        };
        if !fields.is_empty() {
            return Err(ApiError::invalid(fields));
        }
        crate::pipeline::plan(&model.manifest, &r.generate_request()).map_err(|e| match e {
            crate::pipeline::PipelineError::InvalidRequest { field, reason } => {
                let field = match field {
                    "width" | "height" => "image_size",
                    other => other,
                };
                ApiError::field(field, format!("the model cannot run this: {reason}"))
            }
            other => ApiError::internal(other),
        })?;
        Ok(())
    }
}

/// Every check the host makes on a submit body, in order: the host's own fields (`webhook`
/// against the webhook policy, `cache`) taken out, the rest through the validate plugin, every
/// bad field reported at once; then [`HostLimits::check`] (this server's limits and what the
/// model can run). Returns the job's request and its webhook URL.
pub async fn check_submit(
    state: &AppState,
    principal: &Principal,
    mut body: serde_json::Map<String, serde_json::Value>,
) -> Result<(JobRequest, Option<String>), ApiError> {
    // The webhook is the server's to check (where it may call is the operator's network
    // policy); the validate plugin sees the rest.
    let webhook = match body.remove("webhook") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(url)) => state
            .webhooks
            .policy
            .check(&url)
            .await
            .map(|url| Some(url.to_string())),
        Some(_) => Err("must be a string (an http or https URL)".to_string()),
    }
    .map_err(|reason| FieldProblem {
        field: "webhook".into(),
        reason,
    });
    // Step caching is the engine's business, not a policy: checked here, unseen by the plugin.
    let cache = match body.remove("cache") {
        None | Some(serde_json::Value::Null) => Ok(state.limits.cache_default),
        Some(serde_json::Value::String(name)) => CacheMode::parse(&name).ok_or(name),
        Some(other) => Err(other.to_string()),
    }
    .map_err(|got| FieldProblem {
        field: "cache".into(),
        reason: format!(
            "must be one of {} (got {got})",
            CacheMode::NAMES.map(|n| format!("\"{n}\"")).join(", ")
        ),
    });
    let fields = crate::plugins::json_fields(&body);
    let plugins = state.plugins.clone();
    let caller = principal.clone();
    metrics::counter!("wanserve_plugin_calls_total", "slot" => "validate").increment(1);
    let verdict = state
        .plugin_calls
        .run(move || plugins.validate(&caller, &fields))
        .await
        .map_err(ApiError::internal)?;
    let request = match (verdict, webhook.as_ref(), cache.as_ref()) {
        (Ok(Ok(request)), Ok(_), Ok(_)) => request,
        (Ok(verdict), webhook, cache) => {
            // Every bad field at once: the plugin's and the webhook's.
            let mut problems: Vec<FieldProblem> = verdict
                .err()
                .unwrap_or_default()
                .into_iter()
                .map(|e| FieldProblem {
                    field: e.field,
                    reason: e.reason,
                })
                .collect();
            problems.extend(webhook.err().cloned());
            problems.extend(cache.err().cloned());
            return Err(ApiError::invalid(problems));
        }
        (Err(e), _, _) => return Err(ApiError::plugin_failed(Slot::Validate, &e)),
    };
    let webhook_url = webhook.ok().flatten();
    let request = JobRequest {
        cache: cache.unwrap_or_default(),
        ..JobRequest::from(&request)
    };
    state.limits.check(&request)?;
    Ok((request, webhook_url))
}
