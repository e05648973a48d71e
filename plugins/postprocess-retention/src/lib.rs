//! The default postprocess plugin: a finished video is stored as `<request-id>.mp4` and kept for
//! `retention_seconds` (default 3600). `retention_seconds.<tier>` overrides that for callers whose
//! `tier` attribute matches (e.g. `retention_seconds.premium = 86400`). The sweeper's question
//! is answered by the video's recorded expiry: delete once it has passed, keep before.

// Heap inside the initial memory: no memory.grow in an ordinary call (see guest-alloc).
use guest_alloc as _;

wit_bindgen::generate!({ path: "../../wit", world: "postprocess-plugin" });

use exports::wanserve::policy::postprocess::{
    FinishedJob, Guest as Postprocess, OutputPolicy, RetentionDecision, StoredVideo,
};
use wanserve::policy::host;

const DEFAULT_RETENTION_SECONDS: u64 = 3600;

struct Component;

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

fn retention_for(tier: Option<&str>) -> Result<u64, String> {
    if let Some(tier) = tier
        && let Some(s) = seconds(&format!("retention_seconds.{tier}"))?
    {
        return Ok(s);
    }
    Ok(seconds("retention_seconds")?.unwrap_or(DEFAULT_RETENTION_SECONDS))
}

impl Postprocess for Component {
    fn decide(job: FinishedJob) -> OutputPolicy {
        let tier = job
            .caller
            .attributes
            .iter()
            .find(|(k, _)| k == "tier")
            .map(|(_, v)| v.as_str());
        // The self-test refused a bad `retention_seconds`; a bad per-tier value (which it cannot
        // enumerate) is logged and the default applies.
        let retention_seconds = retention_for(tier).unwrap_or_else(|problem| {
            host::log(
                host::LogLevel::Error,
                "bad retention config",
                &[("problem".into(), problem)],
            );
            DEFAULT_RETENTION_SECONDS
        });
        let request = &job.request;
        OutputPolicy {
            object_key: format!("{}.mp4", job.request_id),
            retention_seconds,
            metadata: vec![
                ("caller".into(), job.caller.id.clone()),
                ("model".into(), request.model.clone()),
                (
                    "size".into(),
                    format!("{}x{}", request.width, request.height),
                ),
                ("num_frames".into(), request.num_frames.to_string()),
                ("infer_steps".into(), request.infer_steps.to_string()),
                ("guidance_scale".into(), request.guidance_scale.to_string()),
                ("seed".into(), request.seed.to_string()),
            ],
        }
    }

    fn retain(video: StoredVideo, now: u64) -> RetentionDecision {
        if now >= video.expires_at {
            RetentionDecision::Delete
        } else {
            RetentionDecision::Keep
        }
    }
}

impl Guest for Component {
    fn self_test() -> Result<(), String> {
        retention_for(None).map(|_| ())
    }
}

export!(Component);
