//! A validate plugin to start from: the default rules (the seed's, from `wanserve-policy`, the
//! library the default plugin is built on), then rules of its own, from its config:
//! - `banned-word`: a prompt containing it is refused (none when unset);
//! - `max-frames`: `num_frames` above it is refused (the seed allows 24–120).
//!
//! Every bad field is reported at once, the default rules' and these. The server checks its own
//! limits (pixels × frames, steps, what the model can run) after this, whatever it answers.

// Heap inside the initial memory: no memory.grow in an ordinary call (see guest-alloc).
use guest_alloc as _;

wit_bindgen::generate!({
    path: "../../wit",
    world: "validate-plugin",
    with: {
        "wanserve:policy/types@0.1.0": wanserve_policy::types,
        "wanserve:policy/host@0.1.0": wanserve_policy::host,
    },
});

use exports::wanserve::policy::validate::Guest as Validate;
use wanserve_policy::host;
use wanserve_policy::types::{FieldError, GenerationRequest, JsonValue, Principal};

struct Component;

fn refusal(field: &str, reason: String) -> FieldError {
    FieldError {
        field: field.into(),
        reason,
    }
}

/// This plugin's own rules, on the body as sent (so they apply even where the defaults refuse
/// something else).
fn my_rules(body: &[(String, JsonValue)]) -> Vec<FieldError> {
    let field = |name: &str| body.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let mut errors = Vec::new();
    if let (Some(word), Some(JsonValue::Text(prompt))) =
        (host::config_get("banned-word"), field("prompt"))
    {
        let word = word.trim().to_lowercase();
        if !word.is_empty() && prompt.to_lowercase().contains(&word) {
            errors.push(refusal("prompt", format!("may not contain \"{word}\"")));
        }
    }
    if let (Some(max), Some(JsonValue::Integer(frames))) = (
        host::config_get("max-frames").and_then(|m| m.trim().parse::<i64>().ok()),
        field("num_frames"),
    ) && *frames > max
    {
        errors.push(refusal(
            "num_frames",
            format!("must be at most {max} on this server, got {frames}"),
        ));
    }
    errors
}

impl Validate for Component {
    fn validate(
        _caller: Principal,
        body: Vec<(String, JsonValue)>,
    ) -> Result<GenerationRequest, Vec<FieldError>> {
        let mine = my_rules(&body);
        match wanserve_policy::seed::validate(&body) {
            Ok(request) if mine.is_empty() => Ok(request),
            Ok(_) => Err(mine),
            Err(mut defaults) => {
                defaults.extend(mine);
                Err(defaults)
            }
        }
    }
}

impl Guest for Component {
    /// Run before the plugin is swapped in: the config parses.
    fn self_test() -> Result<(), String> {
        match host::config_get("max-frames") {
            Some(max) if max.trim().parse::<u32>().is_err() => {
                Err(format!("max-frames is not a frame count: {max:?}"))
            }
            _ => Ok(()),
        }
    }
}

export!(Component);
