//! How a component is linked: the WASI it may import but not call, and its pre-instantiation
//! typed by its slot's world.

use super::bindings::{
    self, AdmissionAction, Busy, FieldError, GenerationRequest, JsonValue, Principal, Usage,
};
use super::slot::Slot;
use super::state::PluginState;
use wasmtime::Store;
use wasmtime::component::Linker;

/// The WASI version whose interfaces `wasmtime_wasi` links (a component importing any 0.2.x
/// resolves to it).
pub(super) const WASI_VERSION: &str = "0.2.12";

/// WASI functions a plugin may import but not call, with what to use instead. Time and
/// randomness come from `host` (`now-unix-ms`, `random-u64`) so that what a plugin sees is what
/// the WIT declares; WASI's are replaced by functions that trap, failing the call closed, with
/// a message naming the import to use. (WASI's own rule for deterministic hosts is to omit
/// `get-random-bytes` rather than make it deterministic; a trap is that, at call time, so that a
/// component whose std merely imports it still loads.) `insecure-seed` stays: std's `HashMap`
/// calls it, and it returns a fixed value (`state.rs`), so iteration order is the same every call.
pub(super) const WITHHELD_WASI: &[(&str, &[&str], &str)] = &[
    (
        "wasi:clocks/wall-clock",
        &["now", "resolution"],
        "host.now-unix-ms",
    ),
    (
        "wasi:clocks/monotonic-clock",
        &[
            "now",
            "resolution",
            "subscribe-instant",
            "subscribe-duration",
        ],
        "host.now-unix-ms",
    ),
    (
        "wasi:random/random",
        &["get-random-bytes", "get-random-u64"],
        "host.random-u64",
    ),
    (
        "wasi:random/insecure",
        &["get-insecure-random-bytes", "get-insecure-random-u64"],
        "host.random-u64",
    ),
];

pub(super) fn withhold_wasi_clocks_and_randomness(
    linker: &mut Linker<PluginState>,
) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    for (interface, functions, instead) in WITHHELD_WASI {
        let mut instance = linker.instance(&format!("{interface}@{WASI_VERSION}"))?;
        for function in *functions {
            let message = format!(
                "{interface}.{function} is not available to plugins (no WASI clock or \
                 randomness); use {instead}"
            );
            instance.func_new(function, move |_, _, _, _| {
                Err(wasmtime::Error::msg(message.clone()))
            })?;
        }
    }
    linker.allow_shadowing(false);
    Ok(())
}

/// A component's pre-instantiation, typed by its slot's world (export lookups done once).
#[derive(Clone)]
pub(super) enum SlotPre {
    Auth(bindings::auth::AuthPluginPre<PluginState>),
    Validate(bindings::validate::ValidatePluginPre<PluginState>),
    ValidateAdmission(bindings::validate_admission::ValidateAdmissionPluginPre<PluginState>),
    Postprocess(bindings::postprocess::PostprocessPluginPre<PluginState>),
}

impl SlotPre {
    /// The world the component was typed as.
    pub(super) fn world(&self) -> &'static str {
        match self {
            SlotPre::Auth(_) => Slot::Auth.world(),
            SlotPre::Validate(_) => Slot::Validate.world(),
            SlotPre::ValidateAdmission(_) => "validate-admission-plugin",
            SlotPre::Postprocess(_) => Slot::Postprocess.world(),
        }
    }

    pub(super) fn auth(
        &self,
        store: &mut Store<PluginState>,
    ) -> wasmtime::Result<bindings::auth::AuthPlugin> {
        match self {
            SlotPre::Auth(pre) => pre.instantiate(store),
            _ => Err(wasmtime::format_err!("the auth slot holds another world")),
        }
    }

    pub(super) fn call_validate(
        &self,
        store: &mut Store<PluginState>,
        caller: &Principal,
        body: &[(String, JsonValue)],
    ) -> wasmtime::Result<Result<GenerationRequest, Vec<FieldError>>> {
        match self {
            SlotPre::Validate(pre) => pre
                .instantiate(&mut *store)?
                .wanserve_policy_validate()
                .call_validate(&mut *store, caller, body),
            SlotPre::ValidateAdmission(pre) => pre
                .instantiate(&mut *store)?
                .wanserve_policy_validate()
                .call_validate(&mut *store, caller, body),
            _ => Err(wasmtime::format_err!(
                "the validate slot holds another world"
            )),
        }
    }

    /// `None`: the component has no `admission` (it admits everything).
    pub(super) fn call_admit(
        &self,
        store: &mut Store<PluginState>,
        caller: &Principal,
        usage: Usage,
        action: AdmissionAction,
    ) -> wasmtime::Result<Option<Result<(), Busy>>> {
        match self {
            SlotPre::ValidateAdmission(pre) => pre
                .instantiate(&mut *store)?
                .wanserve_policy_admission()
                .call_admit(&mut *store, caller, usage, action)
                .map(Some),
            SlotPre::Validate(_) => Ok(None),
            _ => Err(wasmtime::format_err!(
                "the validate slot holds another world"
            )),
        }
    }

    pub(super) fn postprocess(
        &self,
        store: &mut Store<PluginState>,
    ) -> wasmtime::Result<bindings::postprocess::PostprocessPlugin> {
        match self {
            SlotPre::Postprocess(pre) => pre.instantiate(store),
            _ => Err(wasmtime::format_err!(
                "the postprocess slot holds another world"
            )),
        }
    }
}
