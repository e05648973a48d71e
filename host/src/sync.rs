//! Lock helpers shared by every layer.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, also after a thread panicked holding it: what it guards here is plain data
/// (tables, counters) that stays usable, and a request must not fail for another one's panic.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
