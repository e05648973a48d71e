//! `wanserve serve`: the seed's REST API over the job store, the job workers, the plugins and the
//! object store. A request's path: `auth::Caller` (auth plugin) → handler in `api.rs`
//! (validate plugin, host limits, store) → `error.rs` maps every failure to HTTP in one place.

pub mod admin;
pub mod admission;
pub mod admission_locks;
pub mod api;
pub mod auth;
pub mod config;
pub mod connections;
pub mod error;
pub mod events;
pub mod job_feeds;
pub mod models;
pub mod ops;
pub mod playground;
pub mod plugin_pool;
pub mod readiness;
pub mod request_check;
pub mod routes;
pub mod startup;
pub mod state;
pub mod webhook_delivery;
pub mod webhooks;

pub use routes::{ApiDoc, router};
pub use startup::{StartupError, serve};
pub use state::{AppState, HostLimits, ModelStatus};
