//! A postprocess plugin to start from: each video is stored as `<caller>/<request id>.mp4`,
//! kept for `retention-seconds` from its config (a day when unset), with the default plugin's
//! metadata (who made it, the request's parameters: `wanserve_policy::retention`), and deleted
//! when its time is up (the default rule).

// Heap inside the initial memory: no memory.grow in an ordinary call (see guest-alloc).
use guest_alloc as _;

// The types and host imports are the guest library's, so its functions fit these exports.
wit_bindgen::generate!({
    path: "../../wit",
    world: "postprocess-plugin",
    with: {
        "wanserve:policy/types@0.1.0": wanserve_policy::types,
        "wanserve:policy/host@0.1.0": wanserve_policy::host,
    },
});

use exports::wanserve::policy::postprocess::{
    FinishedJob, Guest as Postprocess, OutputPolicy, RetentionDecision, StoredVideo,
};
use wanserve_policy::{host, retention};

struct Component;

const DAY_SECONDS: u64 = 24 * 60 * 60;

/// Object keys are relative paths: a caller id keeps `[A-Za-z0-9_-]`, anything else becomes `_`.
fn key_part(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn retention_seconds() -> u64 {
    host::config_get("retention-seconds")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DAY_SECONDS)
}

impl Postprocess for Component {
    fn decide(job: FinishedJob) -> OutputPolicy {
        OutputPolicy {
            object_key: format!("{}/{}.mp4", key_part(&job.caller.id), job.request_id),
            retention_seconds: retention_seconds(),
            metadata: retention::metadata(&job.caller, &job.request),
        }
    }

    fn retain(video: StoredVideo, now: u64) -> RetentionDecision {
        if retention::expired(video.expires_at, now) {
            RetentionDecision::Delete
        } else {
            RetentionDecision::Keep
        }
    }
}

impl Guest for Component {
    /// Run before the plugin is swapped in: the config parses, keys stay inside the store.
    fn self_test() -> Result<(), String> {
        if let Some(value) = host::config_get("retention-seconds")
            && value.trim().parse::<u64>().is_err()
        {
            return Err(format!(
                "retention-seconds is not a number of seconds: {value:?}"
            ));
        }
        match key_part("jwt:alice/../x").as_str() {
            "jwt_alice____x" => Ok(()),
            other => Err(format!("unsafe key part {other:?}")),
        }
    }
}

export!(Component);
