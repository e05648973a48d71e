//! The seed document's parameter rules (shared/seed/video-api.en.md §4), field by field:
//! `model` must be `Wan2.1-T2V-1.3B` (or, on a server with several models, one of the names
//! `host.models` gives); `prompt` 10–500 characters (Unicode scalar values, not
//! bytes); `image_size` `480x832` or `832x480` (WIDTHxHEIGHT); `num_frames` 24–120;
//! `guidance_scale` 1.0–20.0; `infer_steps` 20–100; optional `seed` 0–2147483647 (drawn when
//! absent); optional `negative_prompt` up to 500 characters. A model may have its own
//! `num_frames` and `infer_steps` ranges, from the plugin's config ([`range_for`]). Integers must be whole numbers.
//! Unknown and repeated fields are errors too (a typo like `num_frame` should not silently fall
//! back to nothing). Every bad field is reported, not just the first.

use crate::host;
use crate::types::{FieldError, GenerationRequest, JsonValue};

/// The seed's model: what a server given one model directory calls it.
pub const MODEL: &str = "Wan2.1-T2V-1.3B";
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

/// The fields whose range a model may have of its own: the seed's range, and what
/// [`range_for`] reads from the plugin's config for a model.
const PER_MODEL: [(&str, i64, i64); 2] = [("num_frames", 24, 120), ("infer_steps", 20, 100)];

/// The range of `field` (`num_frames` or `infer_steps`) for `model`: the plugin's config
/// `<field>.<model>` as `MIN-MAX` or one number (a few-step distilled model takes
/// `infer_steps.<name> = "3-4"`), else the seed's.
pub fn range_for(field: &str, model: &str) -> Result<(i64, i64), String> {
    let seed = seed_range(field).ok_or_else(|| format!("{field} has no per-model range"))?;
    let key = format!("{field}.{model}");
    let Some(value) = host::config_get(&key) else {
        return Ok(seed);
    };
    let bad = || format!("{key}: expected MIN-MAX or one whole number, got {value:?}");
    let number = |s: &str| s.trim().parse::<i64>().map_err(|_| bad());
    let (low, high) = match value.split_once('-') {
        Some((low, high)) => (number(low)?, number(high)?),
        None => {
            let n = number(&value)?;
            (n, n)
        }
    };
    if low < 1 || low > high {
        return Err(bad());
    }
    Ok((low, high))
}

/// The seed's range of a field that may have per-model ranges.
fn seed_range(field: &str) -> Option<(i64, i64)> {
    PER_MODEL
        .iter()
        .find(|(name, _, _)| *name == field)
        .map(|(_, min, max)| (*min, *max))
}

/// Every served model's ranges read (what a self-test should check: a bad one would refuse
/// that model's every request).
pub fn check_config() -> Result<(), String> {
    for model in host::models() {
        for (field, _, _) in PER_MODEL {
            range_for(field, &model)?;
        }
    }
    Ok(())
}

/// The seed's rules for a submit body: every bad field at once, else the request. A missing
/// `seed` is drawn with `host::random-u64`. `num_frames` and `infer_steps` take the model's
/// own range where the plugin's config gives one ([`range_for`]).
pub fn validate(body: &[(String, JsonValue)]) -> Result<GenerationRequest, Vec<FieldError>> {
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
            let served = host::models();
            if served.iter().any(|name| name == m) {
                Some(m.to_string())
            } else {
                let names: Vec<String> = served.iter().map(|name| format!("{name:?}")).collect();
                let wanted = match names.as_slice() {
                    [one] => one.clone(),
                    _ => format!("one of {}", names.join(", ")),
                };
                errors.add("model", format!("must be {wanted}, got {m:?}"));
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
    // A model's own ranges, once `model` names one the server serves.
    let range = |field: &str| {
        let seed = seed_range(field).unwrap_or((0, 0));
        match model.as_deref() {
            None => seed,
            Some(model) => range_for(field, model).unwrap_or_else(|problem| {
                host::log(
                    host::LogLevel::Error,
                    "bad per-model range; the seed's applies",
                    &[("problem".into(), problem)],
                );
                seed
            }),
        }
    };
    let (frames_min, frames_max) = range("num_frames");
    let num_frames = required(&mut errors, "num_frames")
        .and_then(|v| integer_in(&mut errors, "num_frames", v, frames_min, frames_max));
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
    let (steps_min, steps_max) = range("infer_steps");
    let infer_steps = required(&mut errors, "infer_steps")
        .and_then(|v| integer_in(&mut errors, "infer_steps", v, steps_min, steps_max));
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
