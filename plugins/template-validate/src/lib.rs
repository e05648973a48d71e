//! A validate plugin to start from: it takes a submit body's fields, refuses what it cannot
//! use (each bad field with its reason, all at once) and otherwise answers the request the job
//! runs with. Its one rule of its own: prompts may not contain the word set in its config as
//! `banned-word` (none when unset). The server checks its own limits (pixels × frames, steps,
//! what the model can run) after this, whatever it answers.

// Heap inside the initial memory: no memory.grow in an ordinary call (see guest-alloc).
use guest_alloc as _;

wit_bindgen::generate!({ path: "../../wit", world: "validate-plugin" });

use exports::wanserve::policy::validate::Guest as Validate;
use wanserve::policy::host;
use wanserve::policy::types::{FieldError, GenerationRequest, JsonValue, Principal};

struct Component;

fn field<'a>(body: &'a [(String, JsonValue)], name: &str) -> Option<&'a JsonValue> {
    body.iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

fn refuse(errors: &mut Vec<FieldError>, field: &str, reason: &str) {
    errors.push(FieldError {
        field: field.into(),
        reason: reason.into(),
    });
}

/// An integer field in `low..=high`, or `default` when absent.
fn integer(
    body: &[(String, JsonValue)],
    name: &str,
    (low, high, default): (i64, i64, i64),
    errors: &mut Vec<FieldError>,
) -> u32 {
    match field(body, name) {
        None | Some(JsonValue::Null) => default as u32,
        Some(JsonValue::Integer(n)) if (low..=high).contains(n) => *n as u32,
        _ => {
            refuse(
                errors,
                name,
                &format!("must be an integer from {low} to {high}"),
            );
            default as u32
        }
    }
}

/// The rule this plugin adds: `banned-word` from its config may not appear in the prompt.
fn banned(prompt: &str) -> Option<String> {
    let word = host::config_get("banned-word")?;
    let word = word.trim().to_lowercase();
    (!word.is_empty() && prompt.to_lowercase().contains(&word)).then_some(word)
}

impl Validate for Component {
    fn validate(
        _caller: Principal,
        body: Vec<(String, JsonValue)>,
    ) -> Result<GenerationRequest, Vec<FieldError>> {
        let mut errors = Vec::new();
        let prompt = match field(&body, "prompt") {
            Some(JsonValue::Text(p)) if !p.trim().is_empty() => p.clone(),
            _ => {
                refuse(&mut errors, "prompt", "is required (a non-empty string)");
                String::new()
            }
        };
        if let Some(word) = banned(&prompt) {
            refuse(
                &mut errors,
                "prompt",
                &format!("may not contain \"{word}\""),
            );
        }
        let (width, height) = match field(&body, "image_size") {
            None | Some(JsonValue::Null) => (832, 480),
            Some(JsonValue::Text(size)) => {
                match size.split_once('x').map(|(w, h)| (w.parse(), h.parse())) {
                    Some((Ok(w), Ok(h))) => (w, h),
                    _ => {
                        refuse(
                            &mut errors,
                            "image_size",
                            "must be WIDTHxHEIGHT, e.g. 832x480",
                        );
                        (832, 480)
                    }
                }
            }
            Some(_) => {
                refuse(&mut errors, "image_size", "must be a string WIDTHxHEIGHT");
                (832, 480)
            }
        };
        let request = GenerationRequest {
            model: "Wan2.1-T2V-1.3B".into(),
            prompt,
            negative_prompt: match field(&body, "negative_prompt") {
                Some(JsonValue::Text(n)) => n.clone(),
                _ => String::new(),
            },
            width,
            height,
            num_frames: integer(&body, "num_frames", (1, 81, 81), &mut errors),
            guidance_scale: 5.0,
            infer_steps: integer(&body, "infer_steps", (1, 100, 50), &mut errors),
            seed: integer(&body, "seed", (0, i64::from(u32::MAX), 0), &mut errors),
        };
        if errors.is_empty() {
            Ok(request)
        } else {
            Err(errors)
        }
    }
}

impl Guest for Component {
    /// Run before the plugin is swapped in: a known answer each way.
    fn self_test() -> Result<(), String> {
        let body = |prompt: &str| vec![("prompt".to_string(), JsonValue::Text(prompt.into()))];
        let caller = Principal {
            id: "self-test".into(),
            display_name: String::new(),
            attributes: vec![],
        };
        if Component::validate(caller.clone(), body("a red fox")).is_err() {
            return Err("refused a plain prompt".into());
        }
        if Component::validate(caller, body("")).is_ok() {
            return Err("accepted an empty prompt".into());
        }
        Ok(())
    }
}

export!(Component);
