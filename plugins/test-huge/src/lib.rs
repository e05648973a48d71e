//! A validate plugin whose answers are too large to use: 1 000 field errors, or (for the
//! prompt "long") a 1 MiB normalised prompt. The host must refuse them, not pass them on.
wit_bindgen::generate!({ path: "../../wit", world: "validate-plugin" });

use exports::wanserve::policy::validate::Guest as Validate;
use wanserve::policy::types::{FieldError, GenerationRequest, JsonValue, Principal};

struct Component;

impl Validate for Component {
    fn validate(
        _: Principal,
        body: Vec<(String, JsonValue)>,
    ) -> Result<GenerationRequest, Vec<FieldError>> {
        let long = body
            .iter()
            .any(|(k, v)| k == "prompt" && matches!(v, JsonValue::Text(t) if t == "long"));
        if long {
            return Ok(GenerationRequest {
                model: "Wan2.1-T2V-1.3B".into(),
                prompt: "x".repeat(1 << 20),
                negative_prompt: String::new(),
                width: 832,
                height: 480,
                num_frames: 24,
                guidance_scale: 5.0,
                infer_steps: 20,
                seed: 0,
            });
        }
        Err((0..1_000)
            .map(|i| FieldError {
                field: format!("field_{i}"),
                reason: "is wrong in a way that takes many words to explain".into(),
            })
            .collect())
    }
}

impl Guest for Component {
    fn self_test() -> Result<(), String> {
        Ok(())
    }
}

export!(Component);
