//! Leases in a shared store: the jobs this process runs are renewed every `lease_renewal`;
//! those it no longer holds (cancelled elsewhere, or taken over by another host after a lapse)
//! are stopped. A store that announces cancels and new jobs (PostgreSQL's NOTIFY) is listened
//! to as well; the renewal is the fallback.

use super::Shared;
use std::sync::Arc;
use std::time::Duration;

impl Shared {
    /// Runs for the life of the process, on the async runtime.
    pub(super) async fn keep_leases(self: Arc<Self>, every: Duration) {
        let mut cancellations = self.store.cancellations();
        let mut queued = self.store.queued();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let cancelled_elsewhere = async {
                match cancellations.as_mut() {
                    Some(rx) => rx.recv().await.ok(),
                    None => std::future::pending().await,
                }
            };
            let queued_elsewhere = async {
                match queued.as_mut() {
                    // A lagged receiver still means jobs were queued.
                    Some(rx) => {
                        if let Err(tokio::sync::broadcast::error::RecvError::Closed) =
                            rx.recv().await
                        {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tick.tick() => self.renew().await,
                _ = queued_elsewhere => self.wake_one(),
                Some(id) = cancelled_elsewhere => {
                    self.jobs.cancel(&id);
                }
            }
        }
    }

    /// One renewal: the jobs the store says this process lost are stopped.
    pub(super) async fn renew(&self) {
        match self.store.renew_leases(&self.jobs.held()).await {
            Ok(lost) => {
                for id in lost {
                    if let Some(attempt) = self.jobs.attempt(&id) {
                        tracing::warn!(request_id = %id, attempt, "no longer this process's job (cancelled, or its lease passed to another host); stopping it");
                        self.jobs.cancel(&id);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot renew job leases"),
        }
    }
}
