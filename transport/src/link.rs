//! Room on a node's upload link: when a node knows its upload capacity (`--upload-rate`),
//! it sends a few pieces more than its upload slots while its link runs under
//! [`ROOM_BELOW`] of that capacity.
//!
//! Why: a node's slots are all taken while its link is half idle whenever some of the
//! nodes it sends to are held back at their own downloads. In `shoal sim`, 1,000 x 1 GiB
//! at 1 Gbit/s, the nodes' links ran 80-89% used with 4 slots (see docs/benchmarks.md).
//!
//! Sans-IO: [`LinkMeter`] takes a byte counter and the time; the daemon feeds it from its
//! connections' counters and `shoal sim` asks [`has_room`] with the flow model's rate.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Pieces a node sends at once beyond its upload slots while its link has room.
pub const EXTRA_UPLOADS: usize = 2;
/// The share of its capacity under which a link has room.
pub const ROOM_BELOW: f64 = 0.9;
/// How far back the meter looks: a few piece times at the link rates shoal sees, short
/// enough to follow uploads starting and ending.
pub const WINDOW: Duration = Duration::from_millis(250);
/// Samples closer together than this add nothing.
const SAMPLE_EVERY: Duration = Duration::from_millis(25);
/// The shortest span a rate is measured over.
const MIN_SPAN: Duration = Duration::from_millis(50);

/// Whether a link sending `sent_per_s` of `capacity_per_s` bytes per second has room.
pub fn has_room(sent_per_s: f64, capacity_per_s: f64) -> bool {
    sent_per_s < ROOM_BELOW * capacity_per_s
}

/// The rate of a growing byte count over the last [`WINDOW`].
#[derive(Debug, Default)]
pub struct LinkMeter {
    /// (when, bytes sent so far), oldest first.
    samples: VecDeque<(Instant, u64)>,
}

impl LinkMeter {
    /// Whether a sample taken now would be new (the caller may skip reading its counters).
    pub fn wants_sample(&self, now: Instant) -> bool {
        self.samples
            .back()
            .is_none_or(|&(at, _)| now.saturating_duration_since(at) >= SAMPLE_EVERY)
    }

    /// Records that `total` bytes have been sent by `now` (a count that only grows).
    pub fn sample(&mut self, now: Instant, total: u64) {
        if !self.wants_sample(now) {
            return;
        }
        // After a silence of a window, what came before says nothing of now.
        if self
            .samples
            .back()
            .is_some_and(|&(at, _)| now.saturating_duration_since(at) >= WINDOW)
        {
            self.samples.clear();
        }
        // Keep one sample at or before the window's start, so the span covers it.
        while self.samples.len() >= 2 && now.saturating_duration_since(self.samples[1].0) >= WINDOW
        {
            self.samples.pop_front();
        }
        self.samples.push_back((now, total));
    }

    /// Bytes per second over the samples kept, or `None` before they span [`MIN_SPAN`]
    /// (also after a silence of a window: the meter starts afresh).
    pub fn rate(&self) -> Option<f64> {
        let (&(first, from), &(last, to)) = (self.samples.front()?, self.samples.back()?);
        let span = last.saturating_duration_since(first);
        if span < MIN_SPAN {
            return None;
        }
        Some(to.saturating_sub(from) as f64 / span.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_has_room_under_nine_tenths() {
        assert!(has_room(0.0, 100.0));
        assert!(has_room(89.0, 100.0));
        assert!(!has_room(90.0, 100.0));
        assert!(!has_room(120.0, 100.0));
    }

    #[test]
    fn the_meter_measures_the_recent_rate() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut meter = LinkMeter::default();
        assert_eq!(meter.rate(), None);
        meter.sample(ms(0), 0);
        meter.sample(ms(10), 1_000); // too soon: ignored
        assert!(!meter.wants_sample(ms(10)));
        meter.sample(ms(25), 2_500);
        assert_eq!(meter.rate(), None, "too short a span");
        // 100 bytes per ms for a second...
        for n in 2..=40 {
            meter.sample(ms(n * 25), n * 2_500);
        }
        let rate = meter.rate().unwrap();
        assert!((rate - 100_000.0).abs() < 1.0, "{rate}");
        // ...then nothing: after a window, the rate is 0.
        for n in 41..=52 {
            meter.sample(ms(n * 25), 40 * 2_500);
        }
        assert_eq!(meter.rate(), Some(0.0));
        assert!(meter.samples.len() <= 12, "{}", meter.samples.len());
    }

    #[test]
    fn after_a_silence_the_meter_starts_afresh() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut meter = LinkMeter::default();
        meter.sample(ms(0), 0);
        meter.sample(ms(100), 10_000);
        assert_eq!(meter.rate(), Some(100_000.0));
        meter.sample(ms(2_000), 10_000);
        assert_eq!(meter.rate(), None, "one sample after the silence");
        meter.sample(ms(2_060), 16_000);
        assert_eq!(meter.rate(), Some(100_000.0));
    }

    #[test]
    fn a_counter_that_goes_back_reads_as_nothing_sent() {
        let t0 = Instant::now();
        let mut meter = LinkMeter::default();
        meter.sample(t0, 5_000);
        meter.sample(t0 + Duration::from_millis(100), 1_000);
        assert_eq!(meter.rate(), Some(0.0));
    }
}
