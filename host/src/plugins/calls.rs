//! Calling a slot's component: a fresh store per call, failures counted, and the guest's
//! answers checked before the host uses them.

use super::bindings::{
    AdmissionAction, Busy, Denial, FieldError, FinishedJob, GenerationRequest, HttpRequest,
    JsonValue, OutputPolicy, Principal, RetentionDecision, StoredVideo, Usage,
};
use super::epoch::EPOCH_TICK;
use super::guest_output::*;
use super::host::{Loaded, PluginHost};
use super::linking::SlotPre;
use super::reuse::RequestParts;
use super::slot::{PluginError, Slot};
use super::state::PluginState;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use wasmtime::{Store, Trap};

/// Counts a call in `wanserve_plugin_calls_running{slot}` while it runs (a panic included):
/// after a call that hit its deadline the gauge shows nothing of it left running.
struct RunningCall(Slot);

impl RunningCall {
    fn start(slot: Slot) -> Self {
        metrics::gauge!("wanserve_plugin_calls_running", "slot" => slot.to_string()).increment(1.0);
        Self(slot)
    }
}

impl Drop for RunningCall {
    fn drop(&mut self) {
        metrics::gauge!("wanserve_plugin_calls_running", "slot" => self.0.to_string())
            .decrement(1.0);
    }
}

impl PluginHost {
    /// Runs `body` against a fresh store for `loaded`, with the memory cap and deadline set.
    pub(super) fn with_store<R>(
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
        let running = RunningCall::start(slot);
        let started = std::time::Instant::now();
        let result = body(&mut store, &loaded.pre);
        drop(running);
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
    pub(super) fn record_failure(&self, loaded: &Loaded, error: &PluginError) {
        let slot = loaded.info.slot;
        self.slots[slot.index()]
            .failures
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!("wanserve_plugin_failures_total", "slot" => slot.to_string())
            .increment(1);
        tracing::warn!(slot = %slot, sha256 = %loaded.info.sha256, error = %error, "plugin call failed closed");
    }

    pub(super) fn current(&self, slot: Slot) -> Result<Arc<Loaded>, PluginError> {
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
