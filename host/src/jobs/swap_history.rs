//! The fleet's plugin swap history ([`SwapBackend`]) in the queue's PostgreSQL database, beside
//! the jobs: every host reads and writes one history per slot, so an upload or a rollback made
//! through any host's admin API is what every host serves (each is told at once by
//! `NOTIFY wanserve_plugin_swaps`, and polls as well) and what each loads at its next start.

use crate::plugins::Slot;
use crate::plugins::swaps::{Change, SwapBackend, SwapError};
use sqlx::PgPool;

/// Names the slot whose history changed.
pub const SWAPS_CHANNEL: &str = "wanserve_plugin_swaps";

pub struct PgSwapHistory {
    pub(super) pool: PgPool,
    pub(super) changes: tokio::sync::broadcast::Sender<Slot>,
}

fn shared(e: sqlx::Error) -> SwapError {
    SwapError::Shared(e.to_string())
}

#[async_trait::async_trait]
impl SwapBackend for PgSwapHistory {
    fn place(&self, slot: Slot) -> String {
        format!("the queue database's {slot} plugin history")
    }

    async fn read(&self, slot: Slot) -> Result<Option<Vec<u8>>, SwapError> {
        let document: Option<Option<Vec<u8>>> =
            sqlx::query_scalar("SELECT history FROM plugin_swap_history WHERE slot = $1")
                .bind(slot.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(shared)?;
        Ok(document.flatten())
    }

    async fn component(&self, slot: Slot, sha256: &str) -> Result<Option<Vec<u8>>, SwapError> {
        sqlx::query_scalar(
            "SELECT bytes FROM plugin_swap_components WHERE slot = $1 AND sha256 = $2",
        )
        .bind(slot.to_string())
        .bind(sha256)
        .fetch_optional(&self.pool)
        .await
        .map_err(shared)
    }

    async fn rewrite(&self, slot: Slot, change: &mut Change<'_>) -> Result<(), SwapError> {
        let slot_name = slot.to_string();
        let mut tx = self.pool.begin().await.map_err(shared)?;
        // The row to lock must exist: two hosts inserting it at once both go on, one after the
        // other, at the FOR UPDATE below.
        sqlx::query(
            "INSERT INTO plugin_swap_history (slot) VALUES ($1) ON CONFLICT (slot) DO NOTHING",
        )
        .bind(&slot_name)
        .execute(&mut *tx)
        .await
        .map_err(shared)?;
        let document: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT history FROM plugin_swap_history WHERE slot = $1 FOR UPDATE",
        )
        .bind(&slot_name)
        .fetch_one(&mut *tx)
        .await
        .map_err(shared)?;
        let Some(rewrite) = change(document.as_deref())? else {
            return tx.rollback().await.map_err(shared);
        };
        if let Some((sha256, bytes)) = &rewrite.add {
            sqlx::query(
                "INSERT INTO plugin_swap_components (slot, sha256, bytes) VALUES ($1, $2, $3) \
                 ON CONFLICT (slot, sha256) DO NOTHING",
            )
            .bind(&slot_name)
            .bind(sha256)
            .bind(bytes)
            .execute(&mut *tx)
            .await
            .map_err(shared)?;
        }
        sqlx::query("DELETE FROM plugin_swap_components WHERE slot = $1 AND sha256 = ANY($2)")
            .bind(&slot_name)
            .bind(&rewrite.remove)
            .execute(&mut *tx)
            .await
            .map_err(shared)?;
        sqlx::query("UPDATE plugin_swap_history SET history = $2 WHERE slot = $1")
            .bind(&slot_name)
            .bind(&rewrite.history)
            .execute(&mut *tx)
            .await
            .map_err(shared)?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(SWAPS_CHANNEL)
            .bind(&slot_name)
            .execute(&mut *tx)
            .await
            .map_err(shared)?;
        tx.commit().await.map_err(shared)
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Slot>> {
        Some(self.changes.subscribe())
    }
}
