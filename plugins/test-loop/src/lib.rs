//! A validate plugin that never returns: the host's deadline must stop it and refuse the request.
wit_bindgen::generate!({ path: "../../wit", world: "validate-plugin" });

use exports::wanserve::policy::validate::Guest as Validate;
use wanserve::policy::types::{FieldError, GenerationRequest, JsonValue, Principal};

struct Component;

impl Validate for Component {
    fn validate(
        _: Principal,
        body: Vec<(String, JsonValue)>,
    ) -> Result<GenerationRequest, Vec<FieldError>> {
        let mut n = body.len() as u64;
        loop {
            n = std::hint::black_box(n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
    }
}

impl Guest for Component {
    fn self_test() -> Result<(), String> {
        Ok(())
    }
}

export!(Component);
