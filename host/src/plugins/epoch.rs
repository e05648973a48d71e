//! The epoch ticker behind every plugin call's deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use wasmtime::Engine;

/// Advances the engine's epoch every `EPOCH_TICK` while calls come in and parks after
/// `IDLE_TICKS_BEFORE_PARK` ticks without one: a thread waking 1,000 times a second on a machine
/// whose cores ONNX Runtime keeps busy slowed generation measurably, and deadlines only matter
/// while a call runs. Staying awake for a couple of ticks after a call means a stream of requests
/// pays no wake-up per call, while a client polling every few milliseconds does not keep it
/// ticking.
pub(super) struct EpochTicker {
    pub(super) shared: Arc<TickerShared>,
    pub(super) thread: std::thread::Thread,
}

#[derive(Default)]
pub(super) struct TickerShared {
    pub(super) calls_in_flight: AtomicU64,
    pub(super) calls_started: AtomicU64,
    pub(super) parked: AtomicBool,
}

pub(super) const EPOCH_TICK: Duration = Duration::from_millis(1);
pub(super) const IDLE_TICKS_BEFORE_PARK: u32 = 2;
/// Per memory slot, how much may stay resident between calls (only dirtied pages are reset).
pub(super) const KEEP_RESIDENT_BYTES: usize = 8 << 20;

impl EpochTicker {
    pub(super) fn start(engine: &Engine) -> std::io::Result<Self> {
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
    pub(super) fn call_started(&self) -> TickingGuard<'_> {
        self.shared.calls_started.fetch_add(1, Ordering::SeqCst);
        self.shared.calls_in_flight.fetch_add(1, Ordering::SeqCst);
        if self.shared.parked.load(Ordering::SeqCst) {
            self.thread.unpark();
        }
        TickingGuard(self)
    }
}

pub(super) struct TickingGuard<'a>(&'a EpochTicker);

impl Drop for TickingGuard<'_> {
    fn drop(&mut self) {
        self.0.shared.calls_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
