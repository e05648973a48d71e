//! What each plugin call's `Store` holds, and the host imports plugins may call.

use super::bindings::{host_api, types};
use super::jwt::JwtVerifier;
use super::reuse::ReuseRule;
use super::slot::Slot;
use std::collections::BTreeMap;
use std::sync::Arc;
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{ResourceTable, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// Memory limits that remember whether a grow was refused, to tell "out of memory" from other traps.
pub struct Limits {
    inner: StoreLimits,
    refused: bool,
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.inner.memory_growing(current, desired, maximum);
        if !matches!(allowed, Ok(true)) {
            self.refused = true;
        }
        allowed
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }
}

/// What the host knows about an installed component, shared by all its calls.
pub struct PluginContext {
    pub slot: Slot,
    pub config: BTreeMap<String, String>,
    pub jwt: Option<JwtVerifier>,
    /// Enough of the component's SHA-256 to tell versions apart in logs.
    pub sha256_prefix: String,
    /// The models the server serves (`host.models`), its default first.
    pub models: Arc<[String]>,
}

/// What WASI's `insecure-seed` returns to every plugin call (std's `HashMap` keys).
const INSECURE_SEED: u128 = 0x7761_6e73_6572_7665_2d70_6f6c_6963_7921;

pub struct PluginState {
    pub limits: Limits,
    /// Built on first use: most calls never touch WASI, and building a context seeds a CSPRNG.
    wasi: Option<WasiCtx>,
    table: ResourceTable,
    context: Arc<PluginContext>,
    /// `constant-time-eq` calls made during this call (a metric, and the tests' proof that a
    /// plugin compares against every key).
    pub constant_time_compares: u64,
    /// What an auth call declared about reusing its acceptance (`reuse-principal`).
    pub reuse: Option<ReuseRule>,
}

impl PluginState {
    pub fn new(memory_bytes: usize, context: Arc<PluginContext>) -> Self {
        Self {
            limits: Limits {
                inner: StoreLimitsBuilder::new()
                    .memory_size(memory_bytes)
                    .trap_on_grow_failure(true)
                    .build(),
                refused: false,
            },
            wasi: None,
            table: ResourceTable::new(),
            context,
            constant_time_compares: 0,
            reuse: None,
        }
    }

    pub fn memory_exhausted(&self) -> bool {
        self.limits.refused
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            // No preopened directories, no environment, no arguments, no network: WASI is only
            // there because Rust's std for wasm32-wasip2 imports it. Its clocks and random
            // sources trap (`withhold_wasi_clocks_and_randomness`); the hash-map seed is fixed so
            // that a plugin's output depends on its inputs alone.
            ctx: self.wasi.get_or_insert_with(|| {
                WasiCtxBuilder::new()
                    .insecure_random_seed(INSECURE_SEED)
                    .build()
            }),
            table: &mut self.table,
        }
    }
}

impl types::Host for PluginState {}

impl host_api::Host for PluginState {
    fn log(&mut self, level: host_api::LogLevel, message: String, fields: Vec<(String, String)>) {
        let fields = fields
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join(" ");
        let (slot, plugin) = (self.context.slot, &self.context.sha256_prefix);
        match level {
            host_api::LogLevel::Debug => tracing::debug!(%slot, %plugin, %fields, "{message}"),
            host_api::LogLevel::Info => tracing::info!(%slot, %plugin, %fields, "{message}"),
            host_api::LogLevel::Warn => tracing::warn!(%slot, %plugin, %fields, "{message}"),
            host_api::LogLevel::Error => tracing::error!(%slot, %plugin, %fields, "{message}"),
        }
    }

    fn config_get(&mut self, key: String) -> Option<String> {
        self.context.config.get(&key).cloned()
    }

    fn models(&mut self) -> Vec<String> {
        self.context.models.to_vec()
    }

    fn now_unix_ms(&mut self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    fn random_u64(&mut self) -> u64 {
        let mut bytes = [0u8; 8];
        // The OS generator; on the vanishingly rare failure, the clock still varies the value.
        if getrandom::fill(&mut bytes).is_err() {
            return self.now_unix_ms().wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        u64::from_le_bytes(bytes)
    }

    fn sha256(&mut self, data: Vec<u8>) -> Vec<u8> {
        use sha2::Digest;
        sha2::Sha256::digest(&data).to_vec()
    }

    fn constant_time_eq(&mut self, a: Vec<u8>, b: Vec<u8>) -> bool {
        use subtle::ConstantTimeEq;
        self.constant_time_compares += 1;
        // Lengths are not secret (hashes have fixed length); contents are compared without an
        // early exit.
        a.len() == b.len() && bool::from(a.ct_eq(&b))
    }

    fn reuse_principal(&mut self, vary_headers: Vec<String>, vary_peer: bool, ttl_ms: u32) {
        if self.context.slot == Slot::Auth {
            self.reuse = ReuseRule::new(vary_headers, vary_peer, ttl_ms);
        }
    }

    fn verify_jwt(&mut self, token: String) -> Result<host_api::JwtClaims, String> {
        match &self.context.jwt {
            Some(verifier) => verifier.verify(&token),
            None => Err("JSON Web Tokens are not accepted here".into()),
        }
    }
}
