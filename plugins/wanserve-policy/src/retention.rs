//! The default postprocess plugin's rules (`postprocess-retention` is these functions): a
//! finished video is stored as `<request-id>.mp4` and kept for `retention_seconds` (default
//! 3600); `retention_seconds.<tier>` overrides that for callers whose `tier` attribute matches
//! (e.g. `retention_seconds.premium = 86400`). The sweeper's question is answered by the
//! video's recorded expiry: delete once it has passed, keep before.

use crate::host;
use crate::types::{GenerationRequest, Principal};

pub const DEFAULT_RETENTION_SECONDS: u64 = 3600;

fn seconds(key: &str) -> Result<Option<u64>, String> {
    match host::config_get(key) {
        None => Ok(None),
        Some(value) => value
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| format!("{key}: not a whole number of seconds: {value:?}")),
    }
}

/// How long a video of a caller in `tier` is kept, or which setting is bad.
pub fn retention_for(tier: Option<&str>) -> Result<u64, String> {
    if let Some(tier) = tier
        && let Some(s) = seconds(&format!("retention_seconds.{tier}"))?
    {
        return Ok(s);
    }
    Ok(seconds("retention_seconds")?.unwrap_or(DEFAULT_RETENTION_SECONDS))
}

/// How long `caller`'s video is kept: [`retention_for`] its `tier`. A bad per-tier value
/// (which the self-test cannot enumerate) is logged and the default applies.
pub fn retention_seconds(caller: &Principal) -> u64 {
    let tier = caller
        .attributes
        .iter()
        .find(|(k, _)| k == "tier")
        .map(|(_, v)| v.as_str());
    retention_for(tier).unwrap_or_else(|problem| {
        host::log(
            host::LogLevel::Error,
            "bad retention config",
            &[("problem".into(), problem)],
        );
        DEFAULT_RETENTION_SECONDS
    })
}

/// The default object key: `<request-id>.mp4`.
pub fn object_key(request_id: &str) -> String {
    format!("{request_id}.mp4")
}

/// The default metadata stored with a video: who asked, and the request's parameters.
pub fn metadata(caller: &Principal, request: &GenerationRequest) -> Vec<(String, String)> {
    vec![
        ("caller".into(), caller.id.clone()),
        ("model".into(), request.model.clone()),
        (
            "size".into(),
            format!("{}x{}", request.width, request.height),
        ),
        ("num_frames".into(), request.num_frames.to_string()),
        ("infer_steps".into(), request.infer_steps.to_string()),
        ("guidance_scale".into(), request.guidance_scale.to_string()),
        ("seed".into(), request.seed.to_string()),
    ]
}

/// The default retention answer: delete once `expires_at` (Unix seconds) has passed.
pub fn expired(expires_at: u64, now: u64) -> bool {
    now >= expires_at
}

/// The default self-test: `retention_seconds` must read.
pub fn self_test() -> Result<(), String> {
    retention_for(None).map(|_| ())
}
