//! Byte-rate limits for piece uploads and downloads (`--upload-rate`, `--download-rate`).
//!
//! A token bucket from `governor`, counted in KiB so that rates up to 4 TiB/s fit its u32
//! cells, with a burst of at least one piece so that a whole piece can always pass.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota};

const CELL: u64 = 1024;
/// The largest piece shoal uses (and the smallest burst the limiter allows).
const MIN_BURST_CELLS: u32 = (64 << 20) / CELL as u32;

#[derive(Debug)]
pub struct ByteRate {
    limiter: DefaultDirectRateLimiter,
    burst: u32,
}

impl ByteRate {
    /// A limit of `bytes_per_second`; `None` for 0 (unlimited).
    pub fn new(bytes_per_second: u64) -> Option<Self> {
        let cells = u32::try_from(bytes_per_second.div_ceil(CELL)).unwrap_or(u32::MAX);
        let per_second = NonZeroU32::new(cells)?;
        let burst = cells.max(MIN_BURST_CELLS);
        let quota =
            Quota::per_second(per_second).allow_burst(NonZeroU32::new(burst).expect("burst > 0"));
        let limiter = DefaultDirectRateLimiter::direct(quota);
        // Start empty: a fresh limiter would let a whole burst through at once.
        let _ = limiter.check_n(NonZeroU32::new(burst).expect("burst > 0"));
        Some(Self { limiter, burst })
    }

    /// Waits until `bytes` may pass.
    pub async fn take(&self, bytes: u64) {
        let cells = u32::try_from(bytes.div_ceil(CELL))
            .unwrap_or(u32::MAX)
            .min(self.burst);
        if let Some(n) = NonZeroU32::new(cells) {
            // Cannot fail: `n` is at most the burst.
            let _ = self.limiter.until_n_ready(n).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn holds_bytes_to_the_rate() {
        assert!(ByteRate::new(0).is_none());
        let rate = ByteRate::new(4 << 20).unwrap(); // 4 MiB/s
        let started = Instant::now();
        for _ in 0..4 {
            rate.take(1 << 20).await;
        }
        let took = started.elapsed();
        // 4 MiB at 4 MiB/s: about a second; generous bounds against a loaded machine.
        assert!(took >= Duration::from_millis(700), "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
    }
}
