//! The default validate plugin: the seed document's parameter rules
//! (`wanserve_policy::seed::validate`, shared/seed/video-api.en.md §4) and fairness between
//! callers.
//!
//! Admission (fairness between callers), from the plugin's config, per caller (its principal)
//! and, with `.<tier>` suffixes, per tier (the principal's `tier` attribute):
//! - `max_queued` (`max_queued.<tier>`): the caller's jobs waiting; default a quarter of the
//!   server's `--queue-limit` (at least 1), so one caller never takes the whole queue.
//! - `max_jobs` (`max_jobs.<tier>`): the caller's jobs waiting and running; default none.
//! - `max_streams` (`max_streams.<tier>`): the caller's open live progress streams; default 16.
//!
//! Beyond a limit: refused for now (429 with `Retry-After`: the host's estimate for jobs,
//! `stream_retry_seconds`, default 10, for streams).

// Heap inside the initial memory: no memory.grow in an ordinary call (see guest-alloc).
use guest_alloc as _;

wit_bindgen::generate!({
    path: "../../wit",
    world: "validate-admission-plugin",
    with: {
        "wanserve:policy/types@0.1.0": wanserve_policy::types,
        "wanserve:policy/host@0.1.0": wanserve_policy::host,
    },
});

use exports::wanserve::policy::admission::{Action, Busy, Guest as Admission, Usage};
use exports::wanserve::policy::validate::Guest as Validate;
use wanserve_policy::host;
use wanserve_policy::seed::validate as check;
use wanserve_policy::types::{FieldError, GenerationRequest, JsonValue, Principal};

struct Component;

impl Validate for Component {
    fn validate(
        _caller: Principal,
        body: Vec<(String, JsonValue)>,
    ) -> Result<GenerationRequest, Vec<FieldError>> {
        check(&body)
    }
}

const DEFAULT_MAX_STREAMS: u32 = 16;
const DEFAULT_STREAM_RETRY_SECONDS: u32 = 10;

/// A whole-number config value: `name.<tier>` for the caller's tier, else `name`. A value that
/// is not a whole number is an error (the self-test reports it before the plugin serves).
fn limit(name: &str, tier: Option<&str>) -> Result<Option<u32>, String> {
    let tiered = tier
        .and_then(|t| host::config_get(&format!("{name}.{t}")).map(|v| (format!("{name}.{t}"), v)));
    match tiered.or_else(|| host::config_get(name).map(|v| (name.to_string(), v))) {
        None => Ok(None),
        Some((key, value)) => value
            .trim()
            .parse::<u32>()
            .map(Some)
            .map_err(|_| format!("{key}: not a whole number: {value:?}")),
    }
}

fn tier(caller: &Principal) -> Option<&str> {
    caller
        .attributes
        .iter()
        .find(|(k, _)| k == "tier")
        .map(|(_, v)| v.as_str())
}

fn admit(caller: &Principal, usage: &Usage, action: Action) -> Result<(), Busy> {
    let tier = tier(caller);
    // A config value the self-test would have refused: refuse rather than admit unbounded.
    let config = |name: &str| {
        limit(name, tier).map_err(|reason| Busy {
            reason: format!("the server's admission config is broken ({reason})"),
            retry_after_seconds: None,
        })
    };
    match action {
        Action::Submit => {
            let max_queued = config("max_queued")?.unwrap_or((usage.queue_limit / 4).max(1));
            if usage.jobs_queued >= max_queued {
                return Err(Busy {
                    reason: format!(
                        "this caller already has {} jobs waiting (at most {max_queued})",
                        usage.jobs_queued
                    ),
                    retry_after_seconds: None,
                });
            }
            if let Some(max_jobs) = config("max_jobs")?
                && usage.jobs_queued.saturating_add(usage.jobs_running) >= max_jobs
            {
                return Err(Busy {
                    reason: format!(
                        "this caller already has {} jobs waiting or running (at most {max_jobs})",
                        usage.jobs_queued.saturating_add(usage.jobs_running)
                    ),
                    retry_after_seconds: None,
                });
            }
            Ok(())
        }
        Action::OpenStream => {
            let max_streams = config("max_streams")?.unwrap_or(DEFAULT_MAX_STREAMS);
            if usage.streams_open >= max_streams {
                let retry = config("stream_retry_seconds")?.unwrap_or(DEFAULT_STREAM_RETRY_SECONDS);
                return Err(Busy {
                    reason: format!(
                        "this caller already has {} progress streams open (at most {max_streams})",
                        usage.streams_open
                    ),
                    retry_after_seconds: Some(retry),
                });
            }
            Ok(())
        }
    }
}

impl Admission for Component {
    fn admit(caller: Principal, usage: Usage, action: Action) -> Result<(), Busy> {
        admit(&caller, &usage, action)
    }
}

impl Guest for Component {
    fn self_test() -> Result<(), String> {
        // The limits must read (a tier's own value is read when a caller of that tier comes:
        // a plugin cannot list its config, and a bad one then refuses rather than admits).
        for name in [
            "max_queued",
            "max_jobs",
            "max_streams",
            "stream_retry_seconds",
        ] {
            limit(name, None)?;
        }
        let caller = Principal {
            id: "self-test".into(),
            display_name: "self-test".into(),
            attributes: Vec::new(),
        };
        let idle = Usage {
            jobs_queued: 0,
            jobs_running: 0,
            streams_open: 0,
            queue_total: 0,
            queue_limit: 100,
        };
        if admit(&caller, &idle, Action::Submit).is_err()
            || admit(&caller, &idle, Action::OpenStream).is_err()
        {
            return Err("a caller with nothing going must be admitted".into());
        }
        // Each served model's own ranges must read.
        wanserve_policy::seed::check_config()?;
        // The server's default model: the seed's rules apply to each it serves.
        let model = host::models().into_iter().next().unwrap_or_default();
        let good = vec![
            ("model".to_string(), JsonValue::Text(model)),
            (
                "prompt".to_string(),
                JsonValue::Text("A beautiful sunset over the mountains".into()),
            ),
            ("image_size".to_string(), JsonValue::Text("832x480".into())),
            ("num_frames".to_string(), JsonValue::Integer(81)),
            ("guidance_scale".to_string(), JsonValue::Number(5.0)),
            ("infer_steps".to_string(), JsonValue::Integer(50)),
        ];
        let ok =
            check(&good).map_err(|e| format!("a valid request was refused: {} errors", e.len()))?;
        if (ok.width, ok.height) != (832, 480) {
            return Err("832x480 must be width 832, height 480".into());
        }
        if check(&[]).map_err(|e| e.len()).err() != Some(6) {
            return Err("an empty body must report its six required fields".into());
        }
        Ok(())
    }
}

export!(Component);
