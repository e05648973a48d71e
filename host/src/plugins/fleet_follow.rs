//! In a fleet, every host serves what the shared swap history names: an upload or a rollback
//! made through one host reaches the others within moments (the history's change notice wakes
//! them; a poll every [`POLL`] catches a notice lost while the database connection was down).
//! When the newest install came from a plugin directory's file, each host keeps what it serves
//! (and serves its own file from its next start). A component that does not install here (this
//! host's limits differ, say) is logged once and this host keeps what it serves.

use super::host::PluginHost;
use super::slot::Slot;
use super::swaps::SwapStore;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How often the history is read even without a change notice.
pub const POLL: Duration = Duration::from_secs(5);

/// Follows the history until `shutting_down` turns true; `None` when nothing but this host
/// writes it (one host's data directory).
pub fn start(
    host: Arc<PluginHost>,
    swaps: Arc<SwapStore>,
    mut shutting_down: tokio::sync::watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let mut changes = Some(swaps.changes()?);
    Some(tokio::spawn(async move {
        let mut follower = Follower {
            host,
            swaps,
            reported: HashMap::new(),
        };
        loop {
            let notice = async {
                match changes.as_mut() {
                    Some(receiver) => match receiver.recv().await {
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => false,
                        // A change, or several missed: either way, read every slot.
                        _ => true,
                    },
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                open = notice => if !open { changes = None },
                _ = tokio::time::sleep(POLL) => {}
                _ = shutting_down.changed() => return,
            }
            for slot in Slot::ALL {
                follower.follow(slot).await;
            }
        }
    }))
}

struct Follower {
    host: Arc<PluginHost>,
    swaps: Arc<SwapStore>,
    /// Per slot, the last problem logged (a digest that does not install, a history that does
    /// not read), so a poll does not log it again.
    reported: HashMap<Slot, String>,
}

impl Follower {
    async fn follow(&mut self, slot: Slot) {
        let Some(serving) = self.host.installed(slot) else {
            return;
        };
        let swaps = self.swaps.clone();
        let _installing = swaps.installing().await;
        let history = match self.swaps.history(slot).await {
            Ok(history) => history,
            Err(e) => {
                self.report(slot, e.to_string(), |problem| {
                    tracing::warn!(slot = %slot, error = %problem, "cannot read the fleet's plugin history; this host keeps what it serves")
                });
                return;
            }
        };
        let Some(wanted) = history.stored_current().cloned() else {
            self.reported.remove(&slot);
            return;
        };
        // The history is small; the component is read only when this host must change.
        if wanted.sha256 == serving.sha256 || self.reported.get(&slot) == Some(&wanted.sha256) {
            return;
        }
        let installed = match self.swaps.component(slot, &wanted.sha256).await {
            Ok(bytes) => {
                let host = self.host.clone();
                tokio::task::spawn_blocking(move || host.replace_component(slot, &bytes))
                    .await
                    .map_err(|_| "the install panicked".to_string())
                    .and_then(|installed| installed.map_err(|e| e.to_string()))
            }
            Err(e) => Err(e.to_string()),
        };
        match installed {
            Ok(info) => {
                self.reported.remove(&slot);
                tracing::info!(slot = %slot, source = "fleet swap", sha256 = %info.sha256, "plugin slot installed");
            }
            Err(reason) => {
                self.reported.insert(slot, wanted.sha256.clone());
                tracing::warn!(slot = %slot, sha256 = %wanted.sha256, %reason, "the fleet's plugin does not install on this host; it keeps what it serves");
            }
        }
    }

    fn report(&mut self, slot: Slot, problem: String, log: impl FnOnce(&str)) {
        if self.reported.get(&slot) != Some(&problem) {
            log(&problem);
            self.reported.insert(slot, problem);
        }
    }
}
