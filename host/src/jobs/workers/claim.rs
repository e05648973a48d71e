//! The loop each worker thread runs: wait for a wake-up (or the idle poll), claim the oldest
//! queued job of the models this host serves once they are loaded, run it on its model, repeat
//! until shutdown.

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
            let claimed = match self.renderers.get() {
                None => None,
                Some(renderers) => match self.block_on(self.store.claim_next(&renderers.names())) {
                    Ok(job) => job.map(|job| (renderers, job)),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot claim a job");
                        None
                    }
                },
            };
            match claimed {
                Some((renderers, job)) => match renderers.get(&job.request.model) {
                    Some(renderer) => self.run(renderer.as_ref(), job),
                    None => self.unserved(job),
                },
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
