//! Bindings generated once from `wit/` (one module per world; the shared `types` and `host`
//! interfaces are generated in `validate` and reused by the others).

pub mod validate {
    wasmtime::component::bindgen!({ path: "../wit", world: "validate-plugin" });
}

pub mod auth {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "auth-plugin",
        with: {
            "wanserve:policy/types": crate::plugins::bindings::validate::wanserve::policy::types,
            "wanserve:policy/host": crate::plugins::bindings::validate::wanserve::policy::host,
        },
    });
}

/// The validate slot with `admission` (tried first; a component without it loads as
/// `validate-plugin`).
pub mod validate_admission {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "validate-admission-plugin",
        with: {
            "wanserve:policy/types": crate::plugins::bindings::validate::wanserve::policy::types,
            "wanserve:policy/host": crate::plugins::bindings::validate::wanserve::policy::host,
        },
    });
}

pub mod postprocess {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "postprocess-plugin",
        with: {
            "wanserve:policy/types": crate::plugins::bindings::validate::wanserve::policy::types,
            "wanserve:policy/host": crate::plugins::bindings::validate::wanserve::policy::host,
        },
    });
}

pub use validate::wanserve::policy::host as host_api;
pub use validate::wanserve::policy::types;

pub use auth::exports::wanserve::policy::auth::{Denial, HttpRequest};
pub use postprocess::exports::wanserve::policy::postprocess::{
    FinishedJob, OutputPolicy, RetentionDecision, StoredVideo,
};
pub use types::{FieldError, GenerationRequest, JsonValue, Principal};
pub use validate_admission::exports::wanserve::policy::admission::{
    Action as AdmissionAction, Busy, Usage,
};
