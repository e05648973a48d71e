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
pub mod config;
mod jwt;
mod reuse;
mod state;
pub mod watch;

use crate::sync::lock;
pub use bindings::auth::exports::wanserve::policy::auth::{Denial, HttpRequest};
pub use bindings::postprocess::exports::wanserve::policy::postprocess::{
    FinishedJob, OutputPolicy, RetentionDecision, StoredVideo,
};
pub use bindings::types::{FieldError, GenerationRequest, JsonValue, Principal};
pub use bindings::validate_admission::exports::wanserve::policy::admission::{
    Action as AdmissionAction, Busy, Usage,
};
use reuse::PrincipalCache;
pub use reuse::RequestParts;

use arc_swap::ArcSwapOption;
use sha2::{Digest, Sha256};
use state::{PluginContext, PluginState};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime::component::{Component, HasSelf, InstancePre, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap,
};

/// The package every plugin is built against.
pub const WIT_PACKAGE: &str = "wanserve:policy@0.1.0";
/// The version part of [`WIT_PACKAGE`].
pub const WIT_VERSION: &str = "0.1.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Slot {
    Auth,
    Validate,
    Postprocess,
}

impl Slot {
    pub const ALL: [Slot; 3] = [Slot::Auth, Slot::Validate, Slot::Postprocess];

    pub fn world(self) -> &'static str {
        match self {
            Slot::Auth => "auth-plugin",
            Slot::Validate => "validate-plugin",
            Slot::Postprocess => "postprocess-plugin",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Slot::Auth => "auth",
            Slot::Validate => "validate",
            Slot::Postprocess => "postprocess",
        })
    }
}

/// Resource limits for one plugin call.
#[derive(Debug, Clone, Copy)]
pub struct PluginLimits {
    /// Linear-memory cap per instance.
    pub memory_bytes: usize,
    /// Wall-clock budget per call.
    pub deadline: Duration,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            // Wall-clock time (epochs), so it must cover a thread waiting for a core: on a
            // 2-core host running two jobs, calls that take 20 µs alone missed 50 ms.
            deadline: Duration::from_millis(250),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(String),
    #[error("does not fit the {slot} slot (world {WIT_PACKAGE}/{world}): {reason}", world = slot.world())]
    WrongWorld { slot: Slot, reason: String },
    #[error("self-test failed: {0}")]
    SelfTest(String),
    #[error("no {0} plugin is installed")]
    NotInstalled(Slot),
    #[error("{slot} plugin ran past its {ms} ms deadline")]
    Deadline { slot: Slot, ms: u128 },
    #[error("{slot} plugin exceeded its memory limit")]
    OutOfMemory { slot: Slot },
    #[error("{slot} plugin failed: {reason}")]
    Trapped { slot: Slot, reason: String },
    #[error("no previous {0} plugin to roll back to")]
    NoPrevious(Slot),
    #[error("{slot} plugin returned an unusable result: {reason}")]
    BadResult { slot: Slot, reason: String },
    #[error("bad configuration for the {slot} plugin: {reason}")]
    Config { slot: Slot, reason: String },
    #[error("cannot set up the plugin engine: {0}")]
    Engine(String),
}

/// The WASI version whose interfaces `wasmtime_wasi` links (a component importing any 0.2.x
/// resolves to it).
const WASI_VERSION: &str = "0.2.12";

/// WASI functions a plugin may import but not call, with what to use instead. Time and
/// randomness come from `host` (`now-unix-ms`, `random-u64`) so that what a plugin sees is what
/// the WIT declares; WASI's are replaced by functions that trap, failing the call closed, with
/// a message naming the import to use. (WASI's own rule for deterministic hosts is to omit
/// `get-random-bytes` rather than make it deterministic; a trap is that, at call time, so that a
/// component whose std merely imports it still loads.) `insecure-seed` stays: std's `HashMap`
/// calls it, and it returns a fixed value (`state.rs`), so iteration order is the same every call.
const WITHHELD_WASI: &[(&str, &[&str], &str)] = &[
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

fn withhold_wasi_clocks_and_randomness(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
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

/// What `replace` and `plugin check` report about a component.
#[derive(Debug, Clone)]
pub struct PluginInfo {
    pub slot: Slot,
    pub world: String,
    pub sha256: String,
    pub size: usize,
    /// When the component was compiled and checked, Unix milliseconds.
    pub loaded_at_ms: i64,
}

/// A component's pre-instantiation, typed by its slot's world (export lookups done once).
#[derive(Clone)]
enum SlotPre {
    Auth(bindings::auth::AuthPluginPre<PluginState>),
    Validate(bindings::validate::ValidatePluginPre<PluginState>),
    ValidateAdmission(bindings::validate_admission::ValidateAdmissionPluginPre<PluginState>),
    Postprocess(bindings::postprocess::PostprocessPluginPre<PluginState>),
}

impl SlotPre {
    /// The world the component was typed as.
    fn world(&self) -> &'static str {
        match self {
            SlotPre::Auth(_) => Slot::Auth.world(),
            SlotPre::Validate(_) => Slot::Validate.world(),
            SlotPre::ValidateAdmission(_) => "validate-admission-plugin",
            SlotPre::Postprocess(_) => Slot::Postprocess.world(),
        }
    }

    fn auth(&self, store: &mut Store<PluginState>) -> wasmtime::Result<bindings::auth::AuthPlugin> {
        match self {
            SlotPre::Auth(pre) => pre.instantiate(store),
            _ => Err(wasmtime::format_err!("the auth slot holds another world")),
        }
    }

    fn call_validate(
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
    fn call_admit(
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

    fn postprocess(
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

struct Loaded {
    info: PluginInfo,
    pre: SlotPre,
    context: Arc<PluginContext>,
    /// Acceptances this component let the host reuse (auth only; empty for the others).
    reused: PrincipalCache,
}

#[derive(Default)]
struct SlotState {
    current: ArcSwapOption<Loaded>,
    previous: Mutex<Option<Arc<Loaded>>>,
    failures: AtomicU64,
    constant_time_compares: AtomicU64,
    /// Per-slot call budget in milliseconds (0: the host's default).
    deadline_ms: AtomicU64,
    /// Held while the slot's component or config changes, so two changes cannot interleave.
    swap_lock: Mutex<()>,
}

pub struct PluginHost {
    engine: Engine,
    linker: Linker<PluginState>,
    limits: PluginLimits,
    slots: [SlotState; 3],
    ticker: EpochTicker,
}

/// Advances the engine's epoch every `EPOCH_TICK` while calls come in and parks after
/// `IDLE_TICKS_BEFORE_PARK` ticks without one: a thread waking 1,000 times a second on a machine
/// whose cores ONNX Runtime keeps busy slowed generation measurably, and deadlines only matter
/// while a call runs. Staying awake for a couple of ticks after a call means a stream of requests
/// pays no wake-up per call, while a client polling every few milliseconds does not keep it
/// ticking.
struct EpochTicker {
    shared: Arc<TickerShared>,
    thread: std::thread::Thread,
}

#[derive(Default)]
struct TickerShared {
    calls_in_flight: AtomicU64,
    calls_started: AtomicU64,
    parked: AtomicBool,
}

const EPOCH_TICK: Duration = Duration::from_millis(1);
const IDLE_TICKS_BEFORE_PARK: u32 = 2;
/// Per memory slot, how much may stay resident between calls (only dirtied pages are reset).
const KEEP_RESIDENT_BYTES: usize = 8 << 20;

impl EpochTicker {
    fn start(engine: &Engine) -> std::io::Result<Self> {
        let weak = engine.weak();
        let shared = Arc::new(TickerShared::default());
        let state = shared.clone();
        let handle = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                let (mut idle_ticks, mut seen_calls) = (0, 0);
                while let Some(engine) = weak.upgrade() {
                    let started = state.calls_started.load(Ordering::SeqCst);
                    if started != seen_calls || state.calls_in_flight.load(Ordering::SeqCst) > 0 {
                        (idle_ticks, seen_calls) = (0, started);
                    } else {
                        idle_ticks += 1;
                    }
                    if idle_ticks < IDLE_TICKS_BEFORE_PARK {
                        engine.increment_epoch();
                        drop(engine);
                        std::thread::sleep(EPOCH_TICK);
                        continue;
                    }
                    drop(engine);
                    // `parked` before the last look at `calls_in_flight`, and the reverse order in
                    // `call_started`: one of the two sides always sees the other.
                    state.parked.store(true, Ordering::SeqCst);
                    if state.calls_in_flight.load(Ordering::SeqCst) == 0 {
                        // The timeout only lets the thread notice that the engine is gone.
                        std::thread::park_timeout(Duration::from_secs(1));
                    }
                    state.parked.store(false, Ordering::SeqCst);
                    idle_ticks = 0;
                }
            })?;
        Ok(Self {
            shared,
            thread: handle.thread().clone(),
        })
    }

    /// Keeps the epoch ticking until the guard is dropped.
    fn call_started(&self) -> TickingGuard<'_> {
        self.shared.calls_started.fetch_add(1, Ordering::SeqCst);
        self.shared.calls_in_flight.fetch_add(1, Ordering::SeqCst);
        if self.shared.parked.load(Ordering::SeqCst) {
            self.thread.unpark();
        }
        TickingGuard(self)
    }
}

struct TickingGuard<'a>(&'a EpochTicker);

impl Drop for TickingGuard<'_> {
    fn drop(&mut self) {
        self.0.shared.calls_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl PluginHost {
    pub fn new(limits: PluginLimits) -> Result<Self, PluginError> {
        let engine_err = |e: wasmtime::Error| PluginError::Engine(format!("{e:#}"));
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(512)
            .total_core_instances(2048)
            .total_memories(1024)
            .total_tables(2048)
            .max_memory_size(limits.memory_bytes);
        // Resetting a slot with madvise and faulting its pages back in on the next call cost
        // more than the call itself (~60% of an auth+validate pair). Where the kernel can tell
        // which pages a call dirtied (PAGEMAP_SCAN, Linux >= 6.7), reset just those in place
        // and keep the slot's pages resident.
        if PoolingAllocationConfig::is_pagemap_scan_available() {
            pool.pagemap_scan(Enabled::Yes)
                .linear_memory_keep_resident(limits.memory_bytes.min(KEEP_RESIDENT_BYTES))
                .table_keep_resident(1 << 20);
        }
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(engine_err)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(engine_err)?;
        withhold_wasi_clocks_and_randomness(&mut linker).map_err(engine_err)?;
        bindings::types::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |s| s)
            .map_err(engine_err)?;
        bindings::host_api::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |s| s)
            .map_err(engine_err)?;
        let ticker = EpochTicker::start(&engine).map_err(|e| PluginError::Engine(e.to_string()))?;
        Ok(Self {
            engine,
            linker,
            limits,
            slots: Default::default(),
            ticker,
        })
    }

    /// Compiles and type-checks `bytes` against `slot`'s world and runs its self-test; nothing
    /// is installed.
    pub fn check(
        &self,
        slot: Slot,
        bytes: &[u8],
        config: BTreeMap<String, String>,
    ) -> Result<PluginInfo, PluginError> {
        self.prepare(slot, bytes, config).map(|loaded| loaded.info)
    }

    fn prepare(
        &self,
        slot: Slot,
        bytes: &[u8],
        config: BTreeMap<String, String>,
    ) -> Result<Loaded, PluginError> {
        let (pre, info) = self.compile(slot, bytes)?;
        self.configure(pre, info, config)
    }

    /// Compiles `bytes` and checks them against `slot`'s world (export lookups done once).
    fn compile(&self, slot: Slot, bytes: &[u8]) -> Result<(SlotPre, PluginInfo), PluginError> {
        let component = Component::from_binary(&self.engine, bytes)
            .map_err(|e| PluginError::NotAComponent(root_cause(&e)))?;
        let wrong = |e: wasmtime::Error| PluginError::WrongWorld {
            slot,
            reason: root_cause(&e),
        };
        let pre: InstancePre<PluginState> =
            self.linker.instantiate_pre(&component).map_err(wrong)?;
        // The typed pre-instances check that the slot's exports exist with the right types.
        let pre = match slot {
            Slot::Auth => SlotPre::Auth(bindings::auth::AuthPluginPre::new(pre).map_err(wrong)?),
            // With admission if it has it; otherwise the plain world (its error is the one
            // reported: that is the world most components are written for).
            Slot::Validate => {
                match bindings::validate_admission::ValidateAdmissionPluginPre::new(pre.clone()) {
                    Ok(with_admission) => SlotPre::ValidateAdmission(with_admission),
                    Err(_) => SlotPre::Validate(
                        bindings::validate::ValidatePluginPre::new(pre).map_err(wrong)?,
                    ),
                }
            }
            Slot::Postprocess => SlotPre::Postprocess(
                bindings::postprocess::PostprocessPluginPre::new(pre).map_err(wrong)?,
            ),
        };
        let info = PluginInfo {
            slot,
            world: format!("{WIT_PACKAGE}/{}", pre.world()),
            sha256: hex::encode(Sha256::digest(bytes)),
            size: bytes.len(),
            loaded_at_ms: crate::ids::now_ms(),
        };
        Ok((pre, info))
    }

    /// A compiled component with `config`, once its self-test passes with that config. Each
    /// result starts with nothing to reuse: acceptances made under another config (a key since
    /// removed) must not outlive it.
    fn configure(
        &self,
        pre: SlotPre,
        info: PluginInfo,
        config: BTreeMap<String, String>,
    ) -> Result<Loaded, PluginError> {
        let slot = info.slot;
        let jwt = jwt::JwtVerifier::from_config(&config)
            .map_err(|reason| PluginError::Config { slot, reason })?;
        let loaded = Loaded {
            context: Arc::new(PluginContext {
                slot,
                config,
                jwt,
                sha256_prefix: info.sha256.chars().take(12).collect(),
            }),
            info,
            pre,
            reused: PrincipalCache::new(),
        };
        let result = self.with_store(&loaded, |store, pre| match pre {
            SlotPre::Auth(p) => p.instantiate(&mut *store)?.call_self_test(&mut *store),
            SlotPre::Validate(p) => p.instantiate(&mut *store)?.call_self_test(&mut *store),
            SlotPre::ValidateAdmission(p) => {
                p.instantiate(&mut *store)?.call_self_test(&mut *store)
            }
            SlotPre::Postprocess(p) => p.instantiate(&mut *store)?.call_self_test(&mut *store),
        });
        match result {
            Ok(Ok(())) => Ok(loaded),
            Ok(Err(message)) => Err(PluginError::SelfTest(message)),
            Err(e) => Err(PluginError::SelfTest(e.to_string())),
        }
    }

    /// Checks the new component (off the request path), then swaps it in atomically. The
    /// component it replaces is kept for [`PluginHost::rollback`].
    pub fn replace(
        &self,
        slot: Slot,
        bytes: &[u8],
        config: BTreeMap<String, String>,
    ) -> Result<PluginInfo, PluginError> {
        let state = &self.slots[slot.index()];
        let _swapping = lock(&state.swap_lock);
        let loaded = Arc::new(self.prepare(slot, bytes, config)?);
        Ok(self.swap_in(slot, loaded))
    }

    /// [`PluginHost::replace`] with the config the slot serves with now (an upload, a changed
    /// file): read under the same lock a [`PluginHost::reconfigure`] takes, so a component
    /// installed while the config changes cannot come in with the old one.
    pub fn replace_component(&self, slot: Slot, bytes: &[u8]) -> Result<PluginInfo, PluginError> {
        let state = &self.slots[slot.index()];
        let _swapping = lock(&state.swap_lock);
        let config = state
            .current
            .load()
            .as_ref()
            .map(|loaded| loaded.context.config.clone())
            .unwrap_or_default();
        let loaded = Arc::new(self.prepare(slot, bytes, config)?);
        Ok(self.swap_in(slot, loaded))
    }

    fn swap_in(&self, slot: Slot, loaded: Arc<Loaded>) -> PluginInfo {
        let info = loaded.info.clone();
        let state = &self.slots[slot.index()];
        let old = state.current.swap(Some(loaded));
        if let Some(old) = old {
            *lock(&state.previous) = Some(old);
        }
        tracing::info!(slot = %slot, sha256 = %info.sha256, size = info.size, "plugin installed");
        info
    }

    /// Gives the serving component of `slot` (and the one kept for rollback) `config`, once its
    /// self-test passes with it; until then, and if it fails, the old config keeps serving.
    /// `Ok(false)`: nothing to do (the same config, or nothing installed). A kept component
    /// that fails with the new config is dropped rather than kept with the old one: rolling
    /// back must not bring a removed key back.
    pub fn reconfigure(
        &self,
        slot: Slot,
        config: BTreeMap<String, String>,
    ) -> Result<bool, PluginError> {
        let state = &self.slots[slot.index()];
        let _swapping = lock(&state.swap_lock);
        let Some(current) = state.current.load_full() else {
            return Ok(false);
        };
        if current.context.config == config {
            return Ok(false);
        }
        let reconfigured =
            self.configure(current.pre.clone(), current.info.clone(), config.clone())?;
        let mut previous = lock(&state.previous);
        if let Some(kept) = previous.take() {
            match self.configure(kept.pre.clone(), kept.info.clone(), config) {
                Ok(kept) => *previous = Some(Arc::new(kept)),
                Err(e) => {
                    tracing::warn!(slot = %slot, sha256 = %kept.info.sha256, error = %e, "the previous plugin fails with the new config; no rollback to it");
                }
            }
        }
        state.current.store(Some(Arc::new(reconfigured)));
        tracing::info!(slot = %slot, sha256 = %current.info.sha256, "plugin config changed");
        Ok(true)
    }

    /// Puts the previous component of `slot` back (and keeps the current one as the new previous).
    pub fn rollback(&self, slot: Slot) -> Result<PluginInfo, PluginError> {
        let state = &self.slots[slot.index()];
        let _swapping = lock(&state.swap_lock);
        let mut previous = lock(&state.previous);
        let back = previous.take().ok_or(PluginError::NoPrevious(slot))?;
        // What it accepted before it was replaced is not reused: it starts as if installed.
        back.reused.clear();
        let info = back.info.clone();
        *previous = state.current.swap(Some(back));
        tracing::info!(slot = %slot, sha256 = %info.sha256, "plugin rolled back");
        Ok(info)
    }

    /// The config `slot` serves with (`None`: nothing installed).
    pub fn config(&self, slot: Slot) -> Option<BTreeMap<String, String>> {
        self.slots[slot.index()]
            .current
            .load()
            .as_ref()
            .map(|loaded| loaded.context.config.clone())
    }

    pub fn installed(&self, slot: Slot) -> Option<PluginInfo> {
        self.slots[slot.index()]
            .current
            .load()
            .as_ref()
            .map(|l| l.info.clone())
    }

    /// Calls that failed closed in `slot` since start.
    pub fn failures(&self, slot: Slot) -> u64 {
        self.slots[slot.index()].failures.load(Ordering::Relaxed)
    }

    /// `constant-time-eq` host calls made by `slot`'s plugins on the request path since start.
    pub fn constant_time_compares(&self, slot: Slot) -> u64 {
        self.slots[slot.index()]
            .constant_time_compares
            .load(Ordering::Relaxed)
    }

    /// Sets `slot`'s per-call budget (the host's default applies until this is called).
    pub fn set_deadline(&self, slot: Slot, deadline: Duration) {
        let ms = deadline.as_millis().clamp(1, u64::MAX as u128) as u64;
        self.slots[slot.index()]
            .deadline_ms
            .store(ms, Ordering::Relaxed);
    }

    /// The per-call budget of `slot`.
    pub fn deadline(&self, slot: Slot) -> Duration {
        match self.slots[slot.index()].deadline_ms.load(Ordering::Relaxed) {
            0 => self.limits.deadline,
            ms => Duration::from_millis(ms),
        }
    }

    /// Runs `body` against a fresh store for `loaded`, with the memory cap and deadline set.
    fn with_store<R>(
        &self,
        loaded: &Loaded,
        body: impl FnOnce(&mut Store<PluginState>, &SlotPre) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        let slot = loaded.info.slot;
        let mut store = Store::new(
            &self.engine,
            PluginState::new(self.limits.memory_bytes, loaded.context.clone()),
        );
        store.limiter(|s| &mut s.limits);
        let deadline = self.deadline(slot);
        // The ticker may advance the epoch right after the store starts: one extra tick keeps a
        // call from getting less than its budget.
        let ticks = (deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        let ticking = self.ticker.call_started();
        let started = std::time::Instant::now();
        let result = body(&mut store, &loaded.pre);
        drop(ticking);
        // What an operator sets deadlines from: the tail of this under real load.
        metrics::histogram!("wanserve_plugin_call_seconds", "slot" => slot.to_string())
            .record(started.elapsed().as_secs_f64());
        self.slots[slot.index()]
            .constant_time_compares
            .fetch_add(store.data().constant_time_compares, Ordering::Relaxed);
        result.map_err(|e| {
            if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
                PluginError::Deadline {
                    slot,
                    ms: deadline.as_millis(),
                }
            } else if store.data().memory_exhausted() {
                PluginError::OutOfMemory { slot }
            } else {
                PluginError::Trapped {
                    slot,
                    reason: root_cause(&e),
                }
            }
        })
    }

    /// Counts and logs a request-path call that failed closed (self-tests of candidate
    /// components are not counted: they say nothing about the plugin that is serving).
    fn record_failure(&self, loaded: &Loaded, error: &PluginError) {
        let slot = loaded.info.slot;
        self.slots[slot.index()]
            .failures
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!("wanserve_plugin_failures_total", "slot" => slot.to_string())
            .increment(1);
        tracing::warn!(slot = %slot, sha256 = %loaded.info.sha256, error = %error, "plugin call failed closed");
    }

    fn current(&self, slot: Slot) -> Result<Arc<Loaded>, PluginError> {
        self.slots[slot.index()]
            .current
            .load_full()
            .ok_or(PluginError::NotInstalled(slot))
    }

    /// Authenticates a request. `Ok(Err(denial))` is the plugin refusing it; `Err(_)` is the
    /// plugin failing, which the caller must treat as a refusal too (fail closed).
    pub fn authenticate(
        &self,
        request: &HttpRequest,
    ) -> Result<Result<Principal, Denial>, PluginError> {
        let loaded = self.current(Slot::Auth)?;
        self.with_store(&loaded, |store, pre| {
            let answer = pre
                .auth(store)?
                .wanserve_policy_auth()
                .call_authenticate(&mut *store, request)?;
            Ok((answer, store.data_mut().reuse.take()))
        })
        .and_then(|(answer, reuse)| {
            match &answer {
                Ok(principal) => check_principal(principal),
                Err(denial) => check_text("reason", &denial.reason, MAX_TEXT).and(check_text(
                    "challenge",
                    denial.challenge.as_deref().unwrap_or(""),
                    MAX_TEXT,
                )),
            }
            .map_err(|reason| PluginError::BadResult {
                slot: Slot::Auth,
                reason,
            })?;
            if let (Ok(principal), Some(rule)) = (&answer, reuse) {
                loaded
                    .reused
                    .remember(rule, &RequestParts::of(request), principal);
            }
            Ok(answer)
        })
        .inspect_err(|e| self.record_failure(&loaded, e))
    }

    /// The principal the installed auth plugin let the host reuse for a request like this one
    /// (`reuse-principal`), without calling it; `None`: call [`PluginHost::authenticate`].
    pub fn reused_principal(&self, request: &RequestParts<'_>) -> Option<Principal> {
        self.slots[Slot::Auth.index()]
            .current
            .load()
            .as_ref()?
            .reused
            .lookup(request)
    }

    /// Validates a submitted body. `Ok(Err(errors))` is the plugin refusing the request;
    /// `Err(_)` is the plugin failing, which the caller must treat as a refusal too.
    pub fn validate(
        &self,
        caller: &Principal,
        body: &[(String, JsonValue)],
    ) -> Result<Result<GenerationRequest, Vec<FieldError>>, PluginError> {
        let loaded = self.current(Slot::Validate)?;
        self.with_store(&loaded, |store, pre| pre.call_validate(store, caller, body))
            .and_then(|answer| {
                match &answer {
                    Ok(request) => check_request(request),
                    Err(errors) => check_field_errors(errors),
                }
                .map_err(|reason| PluginError::BadResult {
                    slot: Slot::Validate,
                    reason,
                })?;
                Ok(answer)
            })
            .inspect_err(|e| self.record_failure(&loaded, e))
    }

    /// Whether `caller`, having `usage`, may do `action` now. `Ok(Err(busy))` is the plugin
    /// refusing for now (429); `Err(_)` is the plugin failing, which the caller must treat as
    /// a refusal too. A validate plugin without `admission` admits everything.
    pub fn admit(
        &self,
        caller: &Principal,
        usage: Usage,
        action: AdmissionAction,
    ) -> Result<Result<(), Busy>, PluginError> {
        let loaded = self.current(Slot::Validate)?;
        if matches!(loaded.pre, SlotPre::Validate(_)) {
            return Ok(Ok(()));
        }
        self.with_store(&loaded, |store, pre| {
            pre.call_admit(store, caller, usage, action)
        })
        .and_then(|answer| {
            let answer = answer.unwrap_or(Ok(()));
            if let Err(busy) = &answer {
                check_text("busy reason", &busy.reason, MAX_TEXT).map_err(|reason| {
                    PluginError::BadResult {
                        slot: Slot::Validate,
                        reason,
                    }
                })?;
            }
            Ok(answer)
        })
        .inspect_err(|e| self.record_failure(&loaded, e))
    }

    /// The output policy for a finished job. On `Err`, the caller falls back to its own default
    /// (the plugin must not be able to lose a finished video).
    pub fn decide(&self, job: &FinishedJob) -> Result<OutputPolicy, PluginError> {
        let loaded = self.current(Slot::Postprocess)?;
        self.with_store(&loaded, |store, pre| {
            pre.postprocess(store)?
                .wanserve_policy_postprocess()
                .call_decide(&mut *store, job)
        })
        .and_then(|policy| {
            check_output_policy(&policy).map_err(|reason| PluginError::BadResult {
                slot: Slot::Postprocess,
                reason,
            })?;
            Ok(policy)
        })
        .inspect_err(|e| self.record_failure(&loaded, e))
    }

    /// Whether the sweeper may delete `video` now. Fails closed: when no plugin is installed
    /// or it fails, the video is kept (and the failure logged and counted).
    pub fn retain(&self, video: &StoredVideo, now_unix_ms: u64) -> RetentionDecision {
        let Ok(loaded) = self.current(Slot::Postprocess) else {
            return RetentionDecision::Keep;
        };
        self.with_store(&loaded, |store, pre| {
            pre.postprocess(store)?
                .wanserve_policy_postprocess()
                .call_retain(&mut *store, video, now_unix_ms)
        })
        .inspect_err(|e| self.record_failure(&loaded, e))
        .unwrap_or(RetentionDecision::Keep)
    }
}

/// Bounds on what a plugin may hand back: a component's answer is copied out of its memory
/// before the host can look at it, so these keep one bad plugin from flooding logs, responses
/// and the job store.
const MAX_TEXT: usize = 4096;
const MAX_PROMPT: usize = 64 << 10;
const MAX_ENTRIES: usize = 256;

fn check_text(what: &str, text: &str, max: usize) -> Result<(), String> {
    if text.len() > max {
        return Err(format!("{what} is {} bytes (at most {max})", text.len()));
    }
    Ok(())
}

fn check_pairs(what: &str, pairs: &[(String, String)]) -> Result<(), String> {
    if pairs.len() > MAX_ENTRIES {
        return Err(format!("{} {what} (at most {MAX_ENTRIES})", pairs.len()));
    }
    pairs.iter().try_for_each(|(k, v)| {
        check_text(what, k, MAX_TEXT)?;
        check_text(what, v, MAX_TEXT)
    })
}

fn check_principal(principal: &Principal) -> Result<(), String> {
    if principal.id.is_empty() {
        return Err("the principal has no id".into());
    }
    check_text("principal id", &principal.id, MAX_TEXT)?;
    check_text("display name", &principal.display_name, MAX_TEXT)?;
    check_pairs("attributes", &principal.attributes)
}

fn check_request(request: &GenerationRequest) -> Result<(), String> {
    check_text("model", &request.model, MAX_TEXT)?;
    check_text("prompt", &request.prompt, MAX_PROMPT)?;
    check_text("negative prompt", &request.negative_prompt, MAX_PROMPT)
}

fn check_field_errors(errors: &[FieldError]) -> Result<(), String> {
    if errors.is_empty() {
        return Err("a refusal without any field error".into());
    }
    if errors.len() > MAX_ENTRIES {
        return Err(format!(
            "{} field errors (at most {MAX_ENTRIES})",
            errors.len()
        ));
    }
    errors.iter().try_for_each(|e| {
        check_text("field name", &e.field, MAX_TEXT)?;
        check_text("reason", &e.reason, MAX_TEXT)
    })
}

fn check_output_policy(policy: &OutputPolicy) -> Result<(), String> {
    check_object_key(&policy.object_key)?;
    check_pairs("metadata", &policy.metadata)
}

/// Object keys stay inside the store (see [`crate::storage::is_safe_key`]).
fn check_object_key(key: &str) -> Result<(), String> {
    if crate::storage::is_safe_key(key) {
        Ok(())
    } else {
        Err(format!(
            "object key {key:?} is not a safe relative path of at most 512 bytes"
        ))
    }
}

/// The innermost message of an error chain: what went wrong, without the wrapping context.
fn root_cause(e: &wasmtime::Error) -> String {
    let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    chain.join(": ")
}

/// Parses a JSON object into the top-level fields a validate plugin receives.
pub fn json_fields(body: &serde_json::Map<String, serde_json::Value>) -> Vec<(String, JsonValue)> {
    body.iter()
        .map(|(k, v)| {
            let value = match v {
                serde_json::Value::Null => JsonValue::Null,
                serde_json::Value::Bool(b) => JsonValue::Boolean(*b),
                serde_json::Value::Number(n) => match n.as_i64() {
                    Some(i) => JsonValue::Integer(i),
                    None => JsonValue::Number(n.as_f64().unwrap_or(f64::NAN)),
                },
                serde_json::Value::String(s) => JsonValue::Text(s.clone()),
                _ => JsonValue::Other,
            };
            (k.clone(), value)
        })
        .collect()
}
