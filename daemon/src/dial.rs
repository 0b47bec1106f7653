//! One connection attempt per address at a time, and one failure shared by all who waited.
//!
//! Many piece requests may want the same peer at once. The first makes the connection; the
//! others wait for it and use it. When that attempt fails (a peer gone, or a handshake lost
//! on a congested link), the requests that waited for it fail with it at once: each
//! making its own attempt in turn would hold the last of them for several connection
//! timeouts.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

#[derive(Debug)]
struct Failed {
    at: Instant,
    error: String,
}

type Gate = Arc<tokio::sync::Mutex<Option<Failed>>>;

#[derive(Debug)]
pub struct Dialer<K> {
    gates: Mutex<HashMap<K, Gate>>,
}

impl<K> Default for Dialer<K> {
    fn default() -> Self {
        Self {
            gates: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> Dialer<K> {
    /// What `cached` has for `key`, else the result of `attempt`, made by one caller at a
    /// time; callers that waited for an attempt that failed get its error.
    pub async fn dial<T, Fut>(
        &self,
        key: &K,
        cached: impl Fn() -> Option<T>,
        attempt: impl FnOnce() -> Fut,
    ) -> anyhow::Result<T>
    where
        Fut: Future<Output = anyhow::Result<T>>,
    {
        if let Some(found) = cached() {
            return Ok(found);
        }
        let gate = self
            .gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let asked = Instant::now();
        let mut last = gate.lock().await;
        if let Some(found) = cached() {
            return Ok(found);
        }
        if let Some(failed) = last.as_ref().filter(|f| f.at > asked) {
            anyhow::bail!("{} (an attempt this request waited for)", failed.error);
        }
        match attempt().await {
            Ok(made) => {
                *last = None;
                Ok(made)
            }
            Err(e) => {
                *last = Some(Failed {
                    at: Instant::now(),
                    error: format!("{e:#}"),
                });
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    const TIMEOUT: Duration = Duration::from_secs(3);

    #[tokio::test(start_paused = true)]
    async fn callers_waiting_on_a_failed_attempt_fail_with_it() {
        let dialer = Arc::new(Dialer::default());
        let attempts = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let (dialer, attempts) = (dialer.clone(), attempts.clone());
                tokio::spawn(async move {
                    let result = dialer
                        .dial(
                            &"peer",
                            || None::<()>,
                            || async {
                                attempts.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(TIMEOUT).await;
                                anyhow::bail!("connecting to peer timed out")
                            },
                        )
                        .await;
                    (result.unwrap_err().to_string(), started.elapsed())
                })
            })
            .collect();
        for caller in callers {
            let (error, took) = caller.await.unwrap();
            assert!(error.contains("timed out"), "{error}");
            assert_eq!(took, TIMEOUT, "one timeout for all, not one each in turn");
        }
        assert_eq!(attempts.load(Ordering::SeqCst), 1);

        // A later request tries again.
        let again = dialer
            .dial(&"peer", || None, || async { Ok(7) })
            .await
            .unwrap();
        assert_eq!(again, 7);
    }

    #[tokio::test(start_paused = true)]
    async fn callers_waiting_on_a_connection_use_it() {
        let dialer = Arc::new(Dialer::default());
        let made = Arc::new(Mutex::new(None::<u32>));
        let attempts = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..3)
            .map(|_| {
                let (dialer, made, attempts) = (dialer.clone(), made.clone(), attempts.clone());
                tokio::spawn(async move {
                    let cached = || *made.lock().unwrap();
                    dialer
                        .dial(&"peer", cached, || async {
                            attempts.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            *made.lock().unwrap() = Some(42);
                            Ok(42)
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        for caller in callers {
            assert_eq!(caller.await.unwrap(), 42);
        }
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
    }
}
