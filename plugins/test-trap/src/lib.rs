//! A validate plugin that traps (panics, which aborts in wasm) on every call, allocates without
//! bound when the prompt is "grow" (both must fail closed), and, when the prompt is "count",
//! answers how many calls its instance has seen (always 1: every call gets a fresh instance).
wit_bindgen::generate!({ path: "../../wit", world: "validate-plugin" });

use exports::wanserve::policy::validate::Guest as Validate;
use std::sync::atomic::{AtomicU32, Ordering};
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
        if body
            .iter()
            .any(|(k, v)| k == "prompt" && matches!(v, JsonValue::Text(t) if t == "count"))
        {
            // State in a static (data segment) and on the heap: both must start afresh.
            static CALLS: AtomicU32 = AtomicU32::new(0);
            let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
            let heap = Box::new(calls);
            return Err(vec![FieldError {
                field: "calls".into(),
                reason: format!("{calls} {heap:p}"),
            }]);
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
