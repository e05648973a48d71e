//! A validate plugin that traps (panics, which aborts in wasm) on every call, and one that
//! allocates without bound when the prompt says so: both must fail closed.
wit_bindgen::generate!({ path: "../../wit", world: "validate-plugin" });

use exports::wanserve::policy::validate::Guest as Validate;
use wanserve::policy::types::{FieldError, GenerationRequest, JsonValue, Principal};

struct Component;

impl Validate for Component {
    fn validate(
        _: Principal,
        body: Vec<(String, JsonValue)>,
    ) -> Result<GenerationRequest, Vec<FieldError>> {
        if body
            .iter()
            .any(|(k, v)| k == "prompt" && matches!(v, JsonValue::Text(t) if t == "grow"))
        {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        panic!("test-trap always traps");
    }
}

impl Guest for Component {
    fn self_test() -> Result<(), String> {
        Ok(())
    }
}

export!(Component);
