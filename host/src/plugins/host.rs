//! [`PluginHost`]: one wasmtime engine, a component per slot, and swapping them.

use super::bindings;
use super::epoch::{EpochTicker, KEEP_RESIDENT_BYTES};
use super::guest_output::root_cause;
use super::jwt;
use super::linking::{SlotPre, withhold_wasi_clocks_and_randomness};
use super::reuse::PrincipalCache;
use super::slot::{PluginError, PluginInfo, PluginLimits, Slot, WIT_PACKAGE};
use super::state::{PluginContext, PluginState};
use crate::sync::lock;
use arc_swap::ArcSwapOption;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime::component::{Component, HasSelf, InstancePre, Linker};
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub(super) struct Loaded {
    pub(super) info: PluginInfo,
    pub(super) pre: SlotPre,
    pub(super) context: Arc<PluginContext>,
    /// Acceptances this component let the host reuse (auth only; empty for the others).
    pub(super) reused: PrincipalCache,
}

#[derive(Default)]
pub(super) struct SlotState {
    pub(super) current: ArcSwapOption<Loaded>,
    pub(super) previous: Mutex<Option<Arc<Loaded>>>,
    pub(super) failures: AtomicU64,
    pub(super) constant_time_compares: AtomicU64,
    /// Per-slot call budget in milliseconds (0: the host's default).
    pub(super) deadline_ms: AtomicU64,
    /// Held while the slot's component or config changes, so two changes cannot interleave.
    pub(super) swap_lock: Mutex<()>,
}

pub struct PluginHost {
    pub(super) engine: Engine,
    pub(super) linker: Linker<PluginState>,
    pub(super) limits: PluginLimits,
    pub(super) slots: [SlotState; 3],
    pub(super) ticker: EpochTicker,
    /// What `host.models` answers: the server's models, its default first.
    pub(super) models: Arc<[String]>,
}

impl PluginHost {
    /// A host whose plugins see one model, the seed's (`plugin check`, tests).
    pub fn new(limits: PluginLimits) -> Result<Self, PluginError> {
        Self::serving(limits, &[crate::wire::DEFAULT_MODEL.to_string()])
    }

    /// A host whose plugins see `models` (`host.models`): the server's, its default first.
    pub fn serving(limits: PluginLimits, models: &[String]) -> Result<Self, PluginError> {
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
            models: models.into(),
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

    pub(super) fn prepare(
        &self,
        slot: Slot,
        bytes: &[u8],
        config: BTreeMap<String, String>,
    ) -> Result<Loaded, PluginError> {
        let (pre, info) = self.compile(slot, bytes)?;
        self.configure(pre, info, config)
    }

    /// Compiles `bytes` and checks them against `slot`'s world (export lookups done once).
    pub(super) fn compile(
        &self,
        slot: Slot,
        bytes: &[u8],
    ) -> Result<(SlotPre, PluginInfo), PluginError> {
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
    pub(super) fn configure(
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
                models: self.models.clone(),
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
        match self.replace_component_then(slot, bytes, |_| Ok::<_, std::convert::Infallible>(()))? {
            Ok((info, ())) => Ok(info),
            Err(never) => match never {},
        }
    }

    /// [`PluginHost::replace_component`] with `commit` run once the component has passed its
    /// checks and before it serves (recording it where a restart and the fleet find it): when
    /// `commit` fails, the slot keeps what it served and its error is the inner one.
    pub fn replace_component_then<T, E>(
        &self,
        slot: Slot,
        bytes: &[u8],
        commit: impl FnOnce(&PluginInfo) -> Result<T, E>,
    ) -> Result<Result<(PluginInfo, T), E>, PluginError> {
        let state = &self.slots[slot.index()];
        let _swapping = lock(&state.swap_lock);
        let config = state
            .current
            .load()
            .as_ref()
            .map(|loaded| loaded.context.config.clone())
            .unwrap_or_default();
        let loaded = Arc::new(self.prepare(slot, bytes, config)?);
        match commit(&loaded.info) {
            Ok(committed) => Ok(Ok((self.swap_in(slot, loaded), committed))),
            Err(e) => Ok(Err(e)),
        }
    }

    pub(super) fn swap_in(&self, slot: Slot, loaded: Arc<Loaded>) -> PluginInfo {
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
}
