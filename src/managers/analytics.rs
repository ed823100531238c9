//! A device's recent history for `memory.analytics`: one slot per second for the last hour
//! (allocations, their sizes, the peak of allocated bytes and a usage sample) and allocation
//! latencies in HDR histograms. Plain data; time comes in as milliseconds of a monotonic clock.
//!
//! Memory is fixed, whatever the traffic: 3,600 second slots of 112 bytes (about 394 KiB) and
//! at most 120 latency histograms (60 one-second, 60 one-minute) of about 13 KiB each, created
//! as seconds and minutes with allocations come, and reused an hour (or a minute) later.

use hdrhistogram::Histogram;

/// Seconds of history kept, and the largest `window_seconds`.
pub const HISTORY_SECONDS: u64 = 3600;
/// Upper bounds of the allocation size histogram's buckets, in bytes (powers of 4, 1 KiB to
/// 64 GiB); a last bucket, `le` [`INF_BUCKET`], counts everything.
pub const SIZE_BUCKETS: [u64; 14] = [
    1 << 10,
    4 << 10,
    16 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    16 << 20,
    64 << 20,
    256 << 20,
    1 << 30,
    4 << 30,
    16 << 30,
    64 << 30,
];
/// The `le_bytes` of the last, unbounded bucket (+Inf): `i64::MAX`, as the contract says.
pub const INF_BUCKET: u64 = i64::MAX as u64;
/// Upper bounds of the cumulative allocation duration histogram (seconds) that `/metrics` shows.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.000_01, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 10.0, 60.0,
];

const LATENCY_SLOTS: u64 = 60;
/// Latencies are kept in microseconds, from 1 µs to an hour, to 2 significant digits.
const LATENCY_MAX_US: u64 = 3_600_000_000;

/// What the device looked like at the end of a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sample {
    /// Bytes in use on the device as the device reports them (every process).
    pub used_memory: u64,
    /// Bytes of live allocations.
    pub allocated_bytes: u64,
    /// Bytes this service holds from the device.
    pub reserved_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct Second {
    /// The monotonic second held; `u64::MAX` when never written.
    sec: u64,
    allocations: u32,
    sizes: [u32; SIZE_BUCKETS.len() + 1],
    peak_allocated: u64,
    /// The second's sample and the millisecond it was taken.
    sample: Option<(u64, Sample)>,
}

impl Second {
    const EMPTY: Second = Second {
        sec: u64::MAX,
        allocations: 0,
        sizes: [0; SIZE_BUCKETS.len() + 1],
        peak_allocated: 0,
        sample: None,
    };
}

struct LatencySlot {
    /// The second or minute held.
    index: u64,
    hist: Histogram<u32>,
}

/// A device's history.
pub struct History {
    started_sec: u64,
    seconds: Box<[Second]>,
    latency_seconds: Vec<Option<LatencySlot>>,
    latency_minutes: Vec<Option<LatencySlot>>,
    /// The sum of the minute slots held: the default (hour) window without merging 60.
    latency_hour: Option<Histogram<u32>>,
    durations: DurationHistogram,
}

/// Allocation durations since the start, in Prometheus' cumulative form.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DurationHistogram {
    /// Counts per bucket of [`DURATION_BUCKETS`] (not cumulative), and a last one for +Inf.
    pub counts: [u64; DURATION_BUCKETS.len() + 1],
    /// Every duration added, in seconds.
    pub sum_seconds: f64,
    /// How many.
    pub count: u64,
}

/// Allocation latency percentiles over a window, in milliseconds (0 when there were none).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LatencyPercentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
}

/// `memory.analytics` of one device, less its id.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryReport {
    /// The window, in seconds.
    pub window_seconds: u64,
    /// One sample per second that was sampled, oldest first: (monotonic millisecond it was
    /// taken at, sample).
    pub samples: Vec<(u64, Sample)>,
    /// Cumulative counts of allocations by size: (`le_bytes`, count), the last `le` +Inf.
    pub size_histogram: Vec<(u64, u64)>,
    /// Allocation latency percentiles.
    pub latency: LatencyPercentiles,
    /// Allocations in the window.
    pub allocations: u64,
    /// Allocations per second over the window (or since the start, when that is shorter).
    pub allocations_per_second: f64,
    /// The most bytes allocated at once during the window.
    pub peak_allocated_bytes: u64,
}

fn size_bucket(size: u64) -> usize {
    SIZE_BUCKETS
        .iter()
        .position(|&le| size <= le)
        .unwrap_or(SIZE_BUCKETS.len())
}

fn new_latency_histogram() -> Option<Histogram<u32>> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 2).ok()
}

/// Records into the slot of `index`, recycling it if it held an older index (whose counts are
/// then taken out of `sum`, when given).
fn record_latency(
    slots: &mut [Option<LatencySlot>],
    index: u64,
    us: u64,
    sum: Option<&mut Histogram<u32>>,
) {
    let entry = &mut slots[(index % LATENCY_SLOTS) as usize];
    match entry {
        Some(s) if s.index == index => s.hist.saturating_record(us),
        Some(s) => {
            if let Some(sum) = sum {
                let _ = sum.subtract(&s.hist);
            }
            s.index = index;
            s.hist.reset();
            s.hist.saturating_record(us);
        }
        None => {
            if let Some(mut hist) = new_latency_histogram() {
                hist.saturating_record(us);
                *entry = Some(LatencySlot { index, hist });
            }
        }
    }
}

fn percentiles(h: &Histogram<u32>) -> LatencyPercentiles {
    if h.is_empty() {
        return LatencyPercentiles::default();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    LatencyPercentiles {
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
    }
}

impl History {
    /// An empty history starting now.
    pub fn new(now_ms: u64) -> Self {
        History {
            started_sec: now_ms / 1000,
            seconds: vec![Second::EMPTY; HISTORY_SECONDS as usize].into_boxed_slice(),
            latency_seconds: (0..LATENCY_SLOTS).map(|_| None).collect(),
            latency_minutes: (0..LATENCY_SLOTS).map(|_| None).collect(),
            latency_hour: new_latency_histogram(),
            durations: DurationHistogram::default(),
        }
    }

    fn slot(&mut self, now_ms: u64) -> &mut Second {
        let sec = now_ms / 1000;
        let slot = &mut self.seconds[(sec % HISTORY_SECONDS) as usize];
        if slot.sec != sec {
            *slot = Second {
                sec,
                ..Second::EMPTY
            };
        }
        slot
    }

    /// An allocation of `size` bytes was placed.
    pub fn on_allocation(&mut self, size: u64, now_ms: u64) {
        let slot = self.slot(now_ms);
        slot.allocations = slot.allocations.saturating_add(1);
        let b = &mut slot.sizes[size_bucket(size)];
        *b = b.saturating_add(1);
    }

    /// An allocation counted by [`History::on_allocation`] was undone (its pages were refused).
    pub fn undo_allocation(&mut self, size: u64, now_ms: u64) {
        let slot = self.slot(now_ms);
        slot.allocations = slot.allocations.saturating_sub(1);
        let b = &mut slot.sizes[size_bucket(size)];
        *b = b.saturating_sub(1);
    }

    /// Allocated bytes changed from `before` to `after`.
    pub fn on_allocated(&mut self, before: u64, after: u64, now_ms: u64) {
        let slot = self.slot(now_ms);
        slot.peak_allocated = slot.peak_allocated.max(before).max(after);
    }

    /// A `memory.allocate` request took `ms` milliseconds (waiting included).
    pub fn on_latency(&mut self, ms: f64, now_ms: u64) {
        let us = ((ms * 1000.0).round() as u64).clamp(1, LATENCY_MAX_US);
        record_latency(&mut self.latency_seconds, now_ms / 1000, us, None);
        record_latency(
            &mut self.latency_minutes,
            now_ms / 60_000,
            us,
            self.latency_hour.as_mut(),
        );
        if let Some(hour) = self.latency_hour.as_mut() {
            hour.saturating_record(us);
        }
        let seconds = ms / 1000.0;
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(DURATION_BUCKETS.len());
        self.durations.counts[bucket] += 1;
        self.durations.sum_seconds += seconds;
        self.durations.count += 1;
    }

    /// Records how the device looks now (the second's sample; a later one in the same second
    /// replaces it).
    pub fn sample(&mut self, sample: Sample, now_ms: u64) {
        let slot = self.slot(now_ms);
        slot.sample = Some((now_ms, sample));
        slot.peak_allocated = slot.peak_allocated.max(sample.allocated_bytes);
    }

    /// Allocation durations since the start.
    pub fn durations(&self) -> &DurationHistogram {
        &self.durations
    }

    /// The last `window` seconds (1 to [`HISTORY_SECONDS`]), with `allocated` bytes now.
    /// Walks at most `window` slots and 60 histograms (none for the whole hour): never the
    /// allocations.
    pub fn report(&mut self, window: u64, allocated: u64, now_ms: u64) -> HistoryReport {
        let window = window.clamp(1, HISTORY_SECONDS);
        let now_sec = now_ms / 1000;
        let first = now_sec + 1 - window.min(now_sec + 1);
        let mut samples = Vec::new();
        let mut sizes = [0u64; SIZE_BUCKETS.len() + 1];
        let mut allocations = 0u64;
        let mut peak = allocated;
        for sec in first..=now_sec {
            let slot = &self.seconds[(sec % HISTORY_SECONDS) as usize];
            if slot.sec != sec {
                continue;
            }
            allocations += u64::from(slot.allocations);
            for (total, n) in sizes.iter_mut().zip(slot.sizes) {
                *total += u64::from(n);
            }
            peak = peak.max(slot.peak_allocated);
            if let Some(s) = slot.sample {
                samples.push(s);
            }
        }
        let mut cumulative = 0;
        let size_histogram = SIZE_BUCKETS
            .iter()
            .copied()
            .chain([INF_BUCKET])
            .zip(sizes)
            .map(|(le, n)| {
                cumulative += n;
                (le, cumulative)
            })
            .collect();
        let covered = window.min(now_sec.saturating_sub(self.started_sec) + 1);
        HistoryReport {
            window_seconds: window,
            samples,
            size_histogram,
            latency: self.latency(window, now_ms),
            allocations,
            allocations_per_second: allocations as f64 / covered as f64,
            peak_allocated_bytes: peak,
        }
    }

    /// Latency percentiles over the window: to the second up to a minute, else over every whole
    /// minute that overlaps it (at most the last 60; the hour from a running sum, without
    /// merging).
    fn latency(&mut self, window: u64, now_ms: u64) -> LatencyPercentiles {
        let now_minute = now_ms / 60_000;
        // Minutes that left the hour leave the running sum.
        for entry in &mut self.latency_minutes {
            let stale = entry
                .as_ref()
                .is_some_and(|s| s.index + LATENCY_SLOTS <= now_minute);
            if stale && let (Some(s), Some(hour)) = (entry.take(), self.latency_hour.as_mut()) {
                let _ = hour.subtract(&s.hist);
            }
        }
        let (slots, now_index, count) = if window <= LATENCY_SLOTS {
            (&self.latency_seconds, now_ms / 1000, window)
        } else {
            // Every minute that overlaps the window.
            let first_minute = now_ms.saturating_sub(window * 1000) / 60_000;
            let minutes = (now_minute - first_minute + 1).min(LATENCY_SLOTS);
            if minutes == LATENCY_SLOTS
                && let Some(hour) = &self.latency_hour
            {
                return percentiles(hour);
            }
            (&self.latency_minutes, now_minute, minutes)
        };
        let first = now_index + 1 - count.min(now_index + 1);
        let mut merged: Option<Histogram<u32>> = None;
        for slot in slots.iter().flatten() {
            if slot.index < first || slot.index > now_index {
                continue;
            }
            match merged.as_mut() {
                Some(m) => {
                    let _ = m.add(&slot.hist);
                }
                None => merged = Some(slot.hist.clone()),
            }
        }
        merged.as_ref().map(percentiles).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sizes_and_rate_over_the_window() {
        let mut h = History::new(10_000);
        h.on_allocation(1000, 10_000);
        h.on_allocation(5000, 10_500);
        h.on_allocation(1 << 40, 12_000);
        let r = h.report(3600, 0, 12_900);
        assert_eq!(r.allocations, 3);
        assert_eq!(
            r.allocations_per_second, 1.0,
            "3 in the 3 seconds since the start"
        );
        assert_eq!(r.size_histogram[0], (1024, 1));
        assert_eq!(r.size_histogram[1], (4096, 1));
        assert_eq!(r.size_histogram[2], (16384, 2));
        assert_eq!(*r.size_histogram.last().unwrap(), (INF_BUCKET, 3));
        assert_eq!(r.size_histogram[13], (64 << 30, 2));
        let r = h.report(1, 0, 12_900);
        assert_eq!(r.allocations, 1, "only the last second");
        assert_eq!(r.allocations_per_second, 1.0);
    }

    #[test]
    fn slots_are_reused_an_hour_later() {
        let mut h = History::new(0);
        h.on_allocation(10, 1_000);
        h.on_allocation(10, 3_601_000);
        let r = h.report(3600, 0, 3_601_000);
        assert_eq!(r.allocations, 1);
    }

    #[test]
    fn peak_covers_levels_held_into_the_window() {
        let mut h = History::new(0);
        h.on_allocated(0, 100, 0);
        // Freed 2 hours later: the 100 bytes were held into the window.
        h.on_allocated(100, 0, 7_200_000);
        let r = h.report(60, 0, 7_210_000);
        assert_eq!(r.peak_allocated_bytes, 100);
        let r = h.report(5, 0, 7_210_000);
        assert_eq!(
            r.peak_allocated_bytes, 0,
            "the free was before these 5 seconds"
        );
        assert_eq!(h.report(5, 7, 7_210_000).peak_allocated_bytes, 7);
    }

    #[test]
    fn latency_percentiles_per_second_and_per_minute() {
        let mut h = History::new(0);
        for i in 1..=100 {
            h.on_latency(f64::from(i), 5_000);
        }
        let r = h.report(10, 0, 5_500);
        assert!((r.latency.p50 - 50.0).abs() <= 0.5, "{:?}", r.latency);
        assert!((r.latency.p99 - 99.0).abs() <= 1.0, "{:?}", r.latency);
        assert!((r.latency.max - 100.0).abs() <= 1.0, "{:?}", r.latency);
        assert_eq!(h.report(1, 0, 7_000).latency, LatencyPercentiles::default());
        assert!(h.report(600, 0, 300_000).latency.max > 99.0);
        assert_eq!(h.durations().count, 100);
        assert!((h.durations().sum_seconds - 5.05).abs() < 1e-9);
    }

    #[test]
    fn minute_windows_cover_every_minute_they_overlap() {
        let mut h = History::new(0);
        h.on_latency(5.0, 100_000); // minute 1
        // 75 s later, early in minute 2... at 175 s (minute 2): a 120 s window starts at 55 s.
        assert!(h.report(120, 0, 175_000).latency.max > 4.9);
        // Two hours later the hour has forgotten it, the running sum too.
        assert_eq!(
            h.report(3600, 0, 7_300_000).latency,
            LatencyPercentiles::default()
        );
        h.on_latency(1.0, 7_300_000);
        let r = h.report(3600, 0, 7_300_500);
        assert!(r.latency.max < 1.1, "{:?}", r.latency);
    }

    #[test]
    fn samples_one_per_second_the_last_one_wins() {
        let mut h = History::new(0);
        let s = |a| Sample {
            used_memory: 1,
            allocated_bytes: a,
            reserved_bytes: a,
        };
        h.sample(s(1), 1_000);
        h.sample(s(2), 1_900);
        h.sample(s(3), 2_100);
        let r = h.report(3600, 3, 2_500);
        assert_eq!(r.samples, vec![(1_900, s(2)), (2_100, s(3))]);
        assert_eq!(r.peak_allocated_bytes, 3);
    }
}
