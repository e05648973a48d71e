//! A validate plugin that accepts any numbers it is given (no ranges): the server must still
//! refuse jobs past its own limits (`--max-pixel-frames`, `--max-steps`).
wit_bindgen::generate!({ path: "../../wit", world: "validate-plugin" });

use exports::wanserve::policy::validate::Guest as Validate;
use wanserve::policy::types::{FieldError, GenerationRequest, JsonValue, Principal};

struct Component;

fn number(body: &[(String, JsonValue)], field: &str, default: u32) -> u32 {
    match body.iter().find(|(k, _)| k == field).map(|(_, v)| v) {
        Some(JsonValue::Integer(i)) => (*i).clamp(0, u32::MAX as i64) as u32,
        _ => default,
    }
}

impl Validate for Component {
    fn validate(
        _: Principal,
        body: Vec<(String, JsonValue)>,
    ) -> Result<GenerationRequest, Vec<FieldError>> {
        let (width, height) = match body.iter().find(|(k, _)| k == "image_size") {
            Some((_, JsonValue::Text(size))) => {
                let (w, h) = size.split_once('x').unwrap_or(("832", "480"));
                (w.parse().unwrap_or(832), h.parse().unwrap_or(480))
            }
            _ => (832, 480),
        };
        // The model asked for (the host refuses one it does not serve), else the default.
        let model = match body.iter().find(|(k, _)| k == "model") {
            Some((_, JsonValue::Text(name))) => name.clone(),
            _ => wanserve::policy::host::models()
                .into_iter()
                .next()
                .unwrap_or_default(),
        };
        Ok(GenerationRequest {
            model,
            prompt: "anything goes".into(),
            negative_prompt: String::new(),
            width,
            height,
            num_frames: number(&body, "num_frames", 24),
            guidance_scale: 5.0,
            infer_steps: number(&body, "infer_steps", 20),
            seed: 1,
        })
    }
}

impl Guest for Component {
    fn self_test() -> Result<(), String> {
        Ok(())
    }
}

export!(Component);
