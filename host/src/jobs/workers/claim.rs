//! The loop each worker thread runs: wait for a wake-up (or the idle poll), claim the oldest
//! queued job once the model is loaded, run it, repeat until shutdown.

use super::Shared;
use crate::sync::lock;
use std::sync::Arc;

impl Shared {
    pub(super) fn work(self: Arc<Self>) {
        loop {
            if self.stopping() {
                return;
            }
            let seen = *lock(&self.wake);
            let claimed = match self.renderer.get() {
                None => None,
                Some(renderer) => match self.block_on(self.store.claim_next()) {
                    Ok(job) => job.map(|job| (renderer.clone(), job)),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot claim a job");
                        None
                    }
                },
            };
            match claimed {
                Some((renderer, job)) => self.run(renderer.as_ref(), job),
                None => {
                    let guard = lock(&self.wake);
                    if *guard == seen && !self.stopping() {
                        let _ = self
                            .woken
                            .wait_timeout(guard, self.config.idle_poll)
                            .unwrap_or_else(|p| p.into_inner());
                    }
                }
            }
        }
    }
}
