//! Per-caller admission locks (one stripe per principal, so one caller's admissions on this host
//! run one at a time) and the streams each caller has open on this host.

use crate::sync::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Lock stripes: enough that unrelated callers rarely share one, few enough to stay small.
const STRIPES: usize = 64;

pub struct AdmissionLocks {
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// Streams open on this host, per principal id (entries removed at zero).
    streams: Arc<Mutex<HashMap<String, u32>>>,
}

impl Default for AdmissionLocks {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            streams: Arc::default(),
        }
    }
}

/// One open stream, counted against its caller until dropped.
pub struct OpenStream {
    streams: Arc<Mutex<HashMap<String, u32>>>,
    principal_id: String,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        metrics::gauge!("wanserve_event_streams_open").decrement(1.0);
        let mut streams = lock(&self.streams);
        if let Some(open) = streams.get_mut(&self.principal_id) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                streams.remove(&self.principal_id);
            }
        }
    }
}

impl AdmissionLocks {
    pub fn stripe(&self, principal_id: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(principal_id);
        &self.stripes[(hash % STRIPES as u64) as usize]
    }

    /// Streams `principal_id` has open on this host.
    pub fn streams_open(&self, principal_id: &str) -> u32 {
        lock(&self.streams).get(principal_id).copied().unwrap_or(0)
    }

    /// Counts a stream `principal_id` opens.
    pub(super) fn open_stream(&self, principal_id: &str) -> OpenStream {
        *lock(&self.streams)
            .entry(principal_id.to_string())
            .or_insert(0) += 1;
        metrics::gauge!("wanserve_event_streams_open").increment(1.0);
        OpenStream {
            streams: self.streams.clone(),
            principal_id: principal_id.to_string(),
        }
    }
}
