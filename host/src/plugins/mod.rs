//! Policy plugins: WebAssembly components (worlds in `wit/policy.wit`) run by wasmtime.
//!
//! - One `Engine` per host, epoch interruption ticking every millisecond on a background thread
//!   (parked when calls stop), the pooling instance allocator.
//! - Per slot, the component is compiled and type-checked once into an `InstancePre`; every call
//!   gets a fresh `Store` with `StoreLimits` (memory cap) and an epoch deadline.
//! - A call that traps, overruns its deadline or its memory fails *closed*: the caller gets a
//!   [`PluginError`] and must refuse the request (the retention slot keeps the video). Failures
//!   are logged and counted per slot; the next call starts from a fresh instance.
//! - [`PluginHost::replace`] compiles, type-checks and self-tests a new component off the request
//!   path, then swaps it in atomically; calls in flight finish on the old one; the previous
//!   version is kept for [`PluginHost::rollback`].

pub mod api_keys;
mod bindings;
mod calls;
pub mod config;
mod epoch;
pub mod fleet_follow;
mod guest_output;
mod host;
mod jwt;
mod linking;
mod reuse;
pub mod scaffold;
mod slot;
mod state;
pub mod swaps;
pub mod watch;

pub use bindings::{
    AdmissionAction, Busy, Denial, FieldError, FinishedJob, GenerationRequest, HttpRequest,
    JsonValue, OutputPolicy, Principal, RetentionDecision, StoredVideo, Usage,
};
pub use calls::json_fields;
pub use host::PluginHost;
pub use reuse::RequestParts;
pub use slot::{PluginError, PluginInfo, PluginLimits, Slot, WIT_PACKAGE, WIT_VERSION};
