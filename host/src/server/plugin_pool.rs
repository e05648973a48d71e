//! Request-path plugin calls run on a few dedicated threads, never on the async workers: a call
//! may run for its whole deadline. Measured against `spawn_blocking` on 2 cores: tokio's blocking
//! pool grows a thread per concurrent call and hands each call over through a shared mutex;
//! a fixed pool of one thread per core keeps each thread's wasmtime slot and caches warm.

use std::panic::AssertUnwindSafe;

type Call = Box<dyn FnOnce() + Send>;

pub struct PluginPool {
    calls: flume::Sender<Call>,
}

/// The pool has no thread left to run the call (it is shutting down), or the call panicked.
#[derive(Debug, thiserror::Error)]
#[error("the plugin call did not complete")]
pub struct CallLost;

impl PluginPool {
    /// Starts `threads` threads (at least one).
    pub fn start(threads: usize) -> std::io::Result<Self> {
        let (calls, queue) = flume::unbounded::<Call>();
        for n in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("wanserve-plugin-{n}"))
                .spawn(move || {
                    for call in queue.iter() {
                        // A panicking call drops its reply sender (the caller sees `CallLost`);
                        // the thread lives on.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(call));
                    }
                })?;
        }
        Ok(Self { calls })
    }

    /// Runs `call` on a pool thread and waits for its result without blocking the runtime.
    pub async fn run<R: Send + 'static>(
        &self,
        call: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, CallLost> {
        let (reply, result) = tokio::sync::oneshot::channel();
        self.calls
            .send(Box::new(move || {
                let _ = reply.send(call());
            }))
            .map_err(|_| CallLost)?;
        result.await.map_err(|_| CallLost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_calls_and_survives_a_panicking_one() {
        let pool = PluginPool::start(2).expect("pool");
        assert_eq!(pool.run(|| 6 * 7).await.expect("result"), 42);
        assert!(
            pool.run(|| -> u8 { panic!("plugin host bug") })
                .await
                .is_err()
        );
        // Both threads still serve, the one that ran the panic included: two calls that each
        // wait (up to 5 s) for the other to have started can only both finish on two threads.
        use std::sync::{Arc, Condvar, Mutex};
        let started = Arc::new((Mutex::new(0u32), Condvar::new()));
        let meet = |started: Arc<(Mutex<u32>, Condvar)>| {
            move || {
                let (count, arrived) = &*started;
                let mut count = count.lock().expect("lock");
                *count += 1;
                arrived.notify_all();
                let (count, _) = arrived
                    .wait_timeout_while(count, std::time::Duration::from_secs(5), |n| *n < 2)
                    .expect("lock");
                let thread = std::thread::current()
                    .name()
                    .unwrap_or_default()
                    .to_string();
                (*count == 2, thread)
            }
        };
        let (a, b) = tokio::join!(
            pool.run(meet(started.clone())),
            pool.run(meet(started.clone()))
        );
        let ((met_a, thread_a), (met_b, thread_b)) = (a.expect("a"), b.expect("b"));
        assert!(
            met_a && met_b,
            "the calls ran one after the other: one thread left"
        );
        assert_ne!(thread_a, thread_b);
    }
}
