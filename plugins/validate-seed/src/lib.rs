//! The seed document's parameter rules (shared/seed/video-api.en.md §4), field by field:
//! `model` must be `Wan2.1-T2V-1.3B`; `prompt` 10–500 characters (Unicode scalar values, not
//! bytes); `image_size` `480x832` or `832x480` (WIDTHxHEIGHT); `num_frames` 24–120;
//! `guidance_scale` 1.0–20.0; `infer_steps` 20–100; optional `seed` 0–2147483647 (drawn when
//! absent); optional `negative_prompt` up to 500 characters. Integers must be whole numbers.
//! Unknown and repeated fields are errors too (a typo like `num_frame` should not silently fall
//! back to nothing). Every bad field is reported, not just the first.
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

wit_bindgen::generate!({ path: "../../wit", world: "validate-admission-plugin" });

use exports::wanserve::policy::admission::{Action, Busy, Guest as Admission, Usage};
use exports::wanserve::policy::validate::Guest as Validate;
use wanserve::policy::host;
use wanserve::policy::types::{FieldError, GenerationRequest, JsonValue, Principal};

const MODEL: &str = "Wan2.1-T2V-1.3B";
const SIZES: [(&str, u32, u32); 2] = [("480x832", 480, 832), ("832x480", 832, 480)];
const KNOWN: [&str; 8] = [
    "model",
    "prompt",
    "negative_prompt",
    "image_size",
    "num_frames",
    "guidance_scale",
    "infer_steps",
    "seed",
];
const SEED_MAX: i64 = 2_147_483_647;

struct Component;

struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: &str, reason: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            reason: reason.into(),
        });
    }
}

fn describe(value: &JsonValue) -> &'static str {
    match value {
        JsonValue::Null => "null",
        JsonValue::Boolean(_) => "a boolean",
        JsonValue::Integer(_) => "an integer",
        JsonValue::Number(_) => "a number",
        JsonValue::Text(_) => "a string",
        JsonValue::Other => "an array or object",
    }
}

fn text<'a>(errors: &mut Errors, field: &str, value: &'a JsonValue) -> Option<&'a str> {
    match value {
        JsonValue::Text(s) => Some(s),
        other => {
            errors.add(field, format!("must be a string, got {}", describe(other)));
            None
        }
    }
}

/// A whole number: JSON integers, or numbers with no fractional part (`24.0`).
fn integer(errors: &mut Errors, field: &str, value: &JsonValue) -> Option<i64> {
    match value {
        JsonValue::Integer(i) => Some(*i),
        JsonValue::Number(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => Some(*n as i64),
        JsonValue::Number(n) => {
            errors.add(field, format!("must be a whole number, got {n}"));
            None
        }
        other => {
            errors.add(
                field,
                format!("must be an integer, got {}", describe(other)),
            );
            None
        }
    }
}

fn integer_in(
    errors: &mut Errors,
    field: &str,
    value: &JsonValue,
    min: i64,
    max: i64,
) -> Option<i64> {
    let v = integer(errors, field, value)?;
    if v < min || v > max {
        errors.add(field, format!("must be between {min} and {max}, got {v}"));
        return None;
    }
    Some(v)
}

fn chars_in(
    errors: &mut Errors,
    field: &str,
    value: &JsonValue,
    min: usize,
    max: usize,
) -> Option<String> {
    let s = text(errors, field, value)?;
    let n = s.chars().count();
    if n < min || n > max {
        errors.add(
            field,
            format!("must be {min}–{max} characters long, got {n}"),
        );
        return None;
    }
    Some(s.to_string())
}

fn check(body: &[(String, JsonValue)]) -> Result<GenerationRequest, Vec<FieldError>> {
    let mut errors = Errors(Vec::new());
    for (i, (name, _)) in body.iter().enumerate() {
        if !KNOWN.contains(&name.as_str()) {
            errors.add(name, "unknown field");
        } else if body[..i].iter().any(|(n, _)| n == name) {
            errors.add(name, "given more than once");
        }
    }
    let field = |name: &str| {
        body.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .filter(|v| !matches!(v, JsonValue::Null))
    };
    let required = |errors: &mut Errors, name: &str| {
        let v = field(name);
        if v.is_none() {
            errors.add(name, "is required");
        }
        v
    };

    let model = required(&mut errors, "model")
        .and_then(|v| text(&mut errors, "model", v))
        .and_then(|m| {
            if m == MODEL {
                Some(m.to_string())
            } else {
                errors.add("model", format!("must be \"{MODEL}\", got {m:?}"));
                None
            }
        });
    let prompt =
        required(&mut errors, "prompt").and_then(|v| chars_in(&mut errors, "prompt", v, 10, 500));
    let negative_prompt = match field("negative_prompt") {
        None => Some(String::new()),
        Some(v) => chars_in(&mut errors, "negative_prompt", v, 0, 500),
    };
    let size = required(&mut errors, "image_size")
        .and_then(|v| text(&mut errors, "image_size", v))
        .and_then(|s| match SIZES.iter().find(|(name, _, _)| *name == s) {
            Some((_, w, h)) => Some((*w, *h)),
            None => {
                errors.add(
                    "image_size",
                    format!("must be \"480x832\" or \"832x480\", got {s:?}"),
                );
                None
            }
        });
    let num_frames = required(&mut errors, "num_frames")
        .and_then(|v| integer_in(&mut errors, "num_frames", v, 24, 120));
    let guidance_scale = required(&mut errors, "guidance_scale").and_then(|v| {
        let g = match v {
            JsonValue::Integer(i) => *i as f64,
            JsonValue::Number(n) => *n,
            other => {
                errors.add(
                    "guidance_scale",
                    format!("must be a number, got {}", describe(other)),
                );
                return None;
            }
        };
        if !(1.0..=20.0).contains(&g) {
            errors.add(
                "guidance_scale",
                format!("must be between 1.0 and 20.0, got {g}"),
            );
            return None;
        }
        Some(g as f32)
    });
    let infer_steps = required(&mut errors, "infer_steps")
        .and_then(|v| integer_in(&mut errors, "infer_steps", v, 20, 100));
    let seed = match field("seed") {
        None => Some((host::random_u64() % (SEED_MAX as u64 + 1)) as i64),
        Some(v) => integer_in(&mut errors, "seed", v, 0, SEED_MAX),
    };

    match (
        model,
        prompt,
        negative_prompt,
        size,
        num_frames,
        guidance_scale,
        infer_steps,
        seed,
    ) {
        (
            Some(model),
            Some(prompt),
            Some(negative_prompt),
            Some((width, height)),
            Some(f),
            Some(g),
            Some(s),
            Some(seed),
        ) if errors.0.is_empty() => Ok(GenerationRequest {
            model,
            prompt,
            negative_prompt,
            width,
            height,
            num_frames: f as u32,
            guidance_scale: g,
            infer_steps: s as u32,
            seed: seed as u32,
        }),
        _ => Err(errors.0),
    }
}

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
        let good = vec![
            ("model".to_string(), JsonValue::Text(MODEL.into())),
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
