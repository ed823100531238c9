//! Memory pressure per device, in the manner of Linux PSI and the kubelet's eviction thresholds:
//! a level from budget usage, waiting requests, stall time and recent failures, that rises at
//! once and falls only after a hold period (so it does not flap). Plain data; time comes in as
//! milliseconds of a monotonic clock.

use crate::domain::PressureLevel;
use std::collections::VecDeque;

/// Budget usage (allocated + reservations, % of budget) at which each level starts.
pub const USAGE_THRESHOLDS: [(f64, PressureLevel); 4] = [
    (95.0, PressureLevel::Critical),
    (85.0, PressureLevel::High),
    (75.0, PressureLevel::Moderate),
    (60.0, PressureLevel::Low),
];
/// How long a lower level must hold before the level falls, by default.
pub const DEFAULT_HOLD_MS: u64 = 10_000;
const WINDOW_MS: u64 = 60_000;
const TREND_WINDOW_MS: u64 = 10_000;
const TREND_SAMPLE_MS: u64 = 100;

/// One device's pressure bookkeeping. Bounded: stall intervals and failures older than 60 s
/// and trend samples older than 10 s are dropped (at most one sample per 100 ms).
#[derive(Debug, Default)]
pub struct PressureTracker {
    level: Option<PressureLevel>,
    /// Since when the raw level has been below the reported one.
    lower_since: Option<u64>,
    stall_started: Option<u64>,
    stalls: VecDeque<(u64, u64)>,
    /// Stall time of closed stall intervals since the start.
    stall_total_ms: u64,
    /// (when, bytes the device would have needed: charged + requested).
    failures: VecDeque<(u64, u64)>,
    samples: VecDeque<(u64, u64)>,
    /// Charge changes since the last timestamped sample (the clock is read every 32).
    unsampled: u32,
}

/// What `memory.get_pressure` reports of one device (besides its usage and availability).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PressureReading {
    /// The level, with hold applied.
    pub level: PressureLevel,
    /// Milliseconds of the last 10 s during which a request waited for memory.
    pub stall_ms_10s: f64,
    /// The same over 60 s.
    pub stall_ms_60s: f64,
    /// OUT_OF_MEMORY answers in the last 60 s.
    pub failed_allocations_60s: u64,
    /// Change of charged bytes per second over the last 10 s.
    pub trend_bytes_per_second: f64,
}

fn usage_level(usage: f64) -> PressureLevel {
    USAGE_THRESHOLDS
        .iter()
        .find(|(t, _)| usage >= *t)
        .map_or(PressureLevel::None, |(_, l)| *l)
}

impl PressureTracker {
    fn prune(&mut self, now: u64) {
        let cut = now.saturating_sub(WINDOW_MS);
        while self.stalls.front().is_some_and(|&(_, end)| end < cut) {
            self.stalls.pop_front();
        }
        while self.failures.front().is_some_and(|&(t, _)| t < cut) {
            self.failures.pop_front();
        }
        let trend_cut = now.saturating_sub(TREND_WINDOW_MS);
        while self.samples.len() > 1 && self.samples[1].0 <= trend_cut {
            self.samples.pop_front();
        }
    }

    /// The number of waiting requests changed to `waiting`.
    pub fn on_waiting(&mut self, waiting: u64, now: u64) {
        match (waiting > 0, self.stall_started) {
            (true, None) => self.stall_started = Some(now),
            (false, Some(start)) => {
                self.stall_started = None;
                self.stalls.push_back((start, now));
                self.stall_total_ms += now.saturating_sub(start);
            }
            _ => {}
        }
        self.prune(now);
    }

    /// An allocation ended in OUT_OF_MEMORY; the device would have needed `demand` bytes of
    /// budget (what it had charged plus the request).
    pub fn on_failure(&mut self, demand: u64, now: u64) {
        self.failures.push_back((now, demand));
        self.prune(now);
    }

    /// The most budget a request refused in the last 60 s would have needed, if any was.
    pub fn max_failed_demand(&mut self, now: u64) -> Option<u64> {
        self.prune(now);
        self.failures.iter().map(|&(_, d)| d).max()
    }

    /// Milliseconds during which a request waited for memory, since the start.
    pub fn stall_total_ms(&self, now: u64) -> u64 {
        self.stall_total_ms + self.stall_started.map_or(0, |s| now.saturating_sub(s))
    }

    /// Charged bytes changed, on the allocation path: only every 32nd change reads the clock
    /// and takes a sample (readings take one too), so this costs a counter increment.
    pub fn on_charged_fast(&mut self, charged: u64, clock: impl FnOnce() -> u64) {
        self.unsampled += 1;
        if self.unsampled >= 32 || self.samples.is_empty() {
            self.unsampled = 0;
            self.on_charged(charged, clock());
        }
    }

    /// Charged bytes changed (sampled at most every 100 ms).
    pub fn on_charged(&mut self, charged: u64, now: u64) {
        // The first sample stays as the baseline; later ones within 100 ms update the last.
        if self.samples.len() >= 2
            && self
                .samples
                .back()
                .is_some_and(|&(t, _)| now < t + TREND_SAMPLE_MS)
        {
            if let Some(last) = self.samples.back_mut() {
                last.1 = charged;
            }
            return;
        }
        self.samples.push_back((now, charged));
        self.prune(now);
    }

    fn stall_ms(&self, now: u64, window: u64) -> f64 {
        let from = now.saturating_sub(window);
        let overlap = |(s, e): (u64, u64)| e.min(now).saturating_sub(s.max(from));
        let closed: u64 = self.stalls.iter().map(|&i| overlap(i)).sum();
        let open = self.stall_started.map_or(0, |s| overlap((s, now)));
        (closed + open) as f64
    }

    /// The reading now, for a device at `usage` % of its budget with `waiting` requests.
    pub fn read(
        &mut self,
        usage: f64,
        waiting: u64,
        charged: u64,
        now: u64,
        hold_ms: u64,
    ) -> PressureReading {
        self.on_charged(charged, now);
        self.prune(now);
        let stall_10 = self.stall_ms(now, 10_000);
        let stall_60 = self.stall_ms(now, WINDOW_MS);
        let failures = self.failures.len() as u64;
        let mut raw = usage_level(usage);
        if waiting > 0 || stall_10 > 0.0 {
            raw = raw.max_level(PressureLevel::High);
        }
        if failures > 0 {
            raw = raw.max_level(PressureLevel::Moderate);
        }
        if stall_10 >= 5_000.0 {
            raw = PressureLevel::Critical;
        }
        let level = match self.level {
            None => raw,
            Some(current) if raw.value() >= current.value() => {
                self.lower_since = None;
                raw
            }
            Some(current) => {
                let since = *self.lower_since.get_or_insert(now);
                if now.saturating_sub(since) >= hold_ms {
                    self.lower_since = None;
                    raw
                } else {
                    current
                }
            }
        };
        self.level = Some(level);
        let trend = match (self.samples.front(), self.samples.back()) {
            (Some(&(t0, b0)), Some(_)) if now > t0 => {
                (charged as f64 - b0 as f64) / ((now - t0) as f64 / 1000.0)
            }
            _ => 0.0,
        };
        PressureReading {
            level,
            stall_ms_10s: stall_10,
            stall_ms_60s: stall_60,
            failed_allocations_60s: failures,
            trend_bytes_per_second: trend,
        }
    }
}

impl PressureLevel {
    /// The higher of two levels.
    pub fn max_level(self, other: PressureLevel) -> PressureLevel {
        if other.value() > self.value() {
            other
        } else {
            self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_rise_at_once_and_fall_after_the_hold() {
        let mut p = PressureTracker::default();
        assert_eq!(p.read(10.0, 0, 0, 0, 1000).level, PressureLevel::None);
        assert_eq!(p.read(90.0, 0, 0, 100, 1000).level, PressureLevel::High);
        assert_eq!(
            p.read(10.0, 0, 0, 200, 1000).level,
            PressureLevel::High,
            "held"
        );
        assert_eq!(
            p.read(10.0, 0, 0, 900, 1000).level,
            PressureLevel::High,
            "still held"
        );
        assert_eq!(
            p.read(10.0, 0, 0, 1300, 1000).level,
            PressureLevel::None,
            "fallen"
        );
    }

    #[test]
    fn stalls_and_failures_count_in_their_windows() {
        let mut p = PressureTracker::default();
        p.on_waiting(1, 1_000);
        p.on_waiting(0, 3_000);
        p.on_failure(10, 3_000);
        assert_eq!(p.max_failed_demand(3_000), Some(10));
        assert_eq!(p.stall_total_ms(3_500), 2_000);
        let r = p.read(10.0, 0, 0, 4_000, 0);
        assert_eq!(r.stall_ms_10s, 2_000.0);
        assert_eq!(r.failed_allocations_60s, 1);
        assert_eq!(r.level, PressureLevel::High, "stalled in the last 10 s");
        let r = p.read(10.0, 0, 0, 20_000, 0);
        assert_eq!(r.stall_ms_10s, 0.0);
        assert_eq!(r.stall_ms_60s, 2_000.0);
        assert_eq!(
            r.level,
            PressureLevel::Moderate,
            "a failure in the last minute"
        );
        let r = p.read(10.0, 0, 0, 70_000, 0);
        assert_eq!((r.stall_ms_60s, r.failed_allocations_60s), (0.0, 0));
        assert_eq!(r.level, PressureLevel::None);
    }

    #[test]
    fn trend_is_bytes_per_second() {
        let mut p = PressureTracker::default();
        p.on_charged(0, 0);
        p.on_charged(1_000_000, 500);
        p.on_charged(2_000_000, 1_000);
        let r = p.read(10.0, 0, 2_000_000, 1_000, 0);
        assert_eq!(r.trend_bytes_per_second, 2_000_000.0);
    }
}
