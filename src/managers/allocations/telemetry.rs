//! The engine's telemetry: timings, failures, history samples, waiting requests, pressure and
//! the per-device figures that metrics and advice read.

use super::*;

impl AllocationEngine {
    /// Adds the time an allocation took (waiting included) to the device's average and its
    /// latency figures.
    pub fn record_allocation_time(&mut self, device: usize, ms: f64) {
        let d = &mut self.devices[device];
        d.allocation_time_ms_sum += ms;
        d.history.on_latency(ms, self.clock.millis());
    }

    /// Counts an allocation of `requested` bytes that ended in OUT_OF_MEMORY.
    pub fn record_failure(&mut self, device: usize, requested: u64) {
        let d = &mut self.devices[device];
        d.failed_allocations += 1;
        let demand = d.charged().saturating_add(requested);
        d.pressure.on_failure(demand, self.clock.millis());
    }

    /// Takes each device's usage sample for this second (`memory.analytics`' time series).
    pub fn sample_history(&mut self) {
        let now = self.clock.millis();
        for d in &mut self.devices {
            d.sample_history(now);
        }
    }

    /// A device's history over the last `window_seconds` (this second sampled first), and the
    /// monotonic millisecond it was read at. Never walks the allocations.
    pub fn history(&mut self, device: usize, window_seconds: u64) -> (HistoryReport, u64) {
        let now = self.clock.millis();
        let d = &mut self.devices[device];
        d.sample_history(now);
        (d.history.report(window_seconds, d.allocated, now), now)
    }

    /// A device's live bytes by purpose: the `limit` largest, the rest summed under
    /// `rest_label`.
    pub fn bytes_by_purpose(
        &self,
        device: usize,
        limit: usize,
        rest_label: &str,
    ) -> Vec<(String, u64)> {
        self.devices[device]
            .tally
            .bytes_by_purpose(limit, rest_label)
    }

    /// Everything metrics and advice need of a device, from running totals (never walking the
    /// allocations). Reads the pressure level as `memory.get_pressure` does.
    pub fn telemetry(&mut self, device: usize, hold_ms: u64) -> DeviceTelemetry {
        let pressure = self.pressure(device, hold_ms);
        let fragmentation = self.fragmentation(device);
        let now = self.clock.millis();
        let d = &mut self.devices[device];
        let capacity = d.arena.backend_mut().capacity();
        let backend = d.arena.backend();
        DeviceTelemetry {
            device_id: backend.device_id().to_string(),
            memory_type: backend.memory_type(),
            capacity_bytes: capacity.total,
            used_bytes: capacity.used(),
            budget_bytes: d.budget,
            allocated_bytes: d.allocated,
            reservation_bytes: d.reservation,
            reserved_bytes: d.reserved(),
            model_bytes: d.model_bytes,
            peak_allocated_bytes: d.peak_allocated,
            fragmentation,
            pressure,
            stall_seconds_total: d.pressure.stall_total_ms(now) as f64 / 1000.0,
            max_failed_demand_60s: d.pressure.max_failed_demand(now),
            live_allocations: d.live,
            tenant_bytes: {
                let mut v: Vec<(String, u64)> = d
                    .tenant_bytes
                    .iter()
                    .map(|(t, b)| (t.to_string(), *b))
                    .collect();
                v.sort();
                v
            },
            allocations_total: d.total_allocations,
            deallocations_total: d.total_deallocations,
            failures_total: d.failed_allocations,
            bytes_by_type: d.tally.bytes_by_type,
            live_by_type: d.tally.live_by_type,
            total_by_type: d.tally.total_by_type,
            reclaimable_client_bytes: d.tally.reclaimable_client_bytes,
            persistent_client_count: d.tally.persistent_client_count,
            transferred_in_bytes: d.tally.transferred_in_bytes,
            transferred_out_bytes: d.tally.transferred_out_bytes,
            durations: d.history.durations().clone(),
        }
    }

    /// Counts a request starting (`+1`) or ending (`-1`) a wait for memory.
    pub fn record_waiting(&mut self, device: usize, delta: i64) {
        let d = &mut self.devices[device];
        d.waiting = d.waiting.saturating_add_signed(delta);
        d.pressure.on_waiting(d.waiting, self.clock.millis());
    }

    /// A device's memory pressure now; a lower level shows only after `hold_ms`.
    pub fn pressure(&mut self, device: usize, hold_ms: u64) -> PressureView {
        let available = self.available(device);
        let d = &mut self.devices[device];
        let usage = d.utilization();
        let reading = d
            .pressure
            .read(usage, d.waiting, d.charged(), self.clock.millis(), hold_ms);
        PressureView {
            device_id: d.arena.backend().device_id().to_string(),
            level: reading.level,
            usage_percentage: usage,
            available_memory: available,
            waiting_requests: d.waiting,
            stall_ms_10s: reading.stall_ms_10s,
            stall_ms_60s: reading.stall_ms_60s,
            failed_allocations_60s: reading.failed_allocations_60s,
            trend_bytes_per_second: reading.trend_bytes_per_second,
        }
    }

    /// Requests waiting for memory on a device now.
    pub fn waiting(&self, device: usize) -> u64 {
        self.devices[device].waiting
    }
}
