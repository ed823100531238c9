//! The service's read-outs: `memory.analytics`, `memory.optimization_recs`, and the snapshot
//! that `/metrics` renders. None of them walks the allocations, except the advice that needs
//! to (a defragment's outcome, old persistent allocations), and then one device at a time.

use super::MemoryService;
use super::requests::{AnalyticsRequest, OptionalDeviceRequest};
use crate::managers::advisor::{self, IdleModel, OldPersistent, Rules, Situation};
use crate::managers::allocations::DeviceTelemetry;
use crate::protocol::{
    AnalyticsSample, GetAnalyticsResponse, LatencySummary, MemoryAnalytics, ModelState,
    OptimizationRecsResponse, ProtocolError, PurposeBytes, SizeBucket, Timestamp,
};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The most purposes `memory.analytics` lists by name per device; the rest are summed.
pub const PURPOSE_LIMIT: usize = 1000;
/// The key the purposes beyond [`PURPOSE_LIMIT`] are summed under.
pub const OTHER_PURPOSES: &str = "(other purposes)";
/// The most ReviewPersistent recommendations per device.
pub const REVIEW_LIMIT: usize = 10;

/// One model, for metrics and the dashboard.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelTelemetry {
    /// Its name.
    pub name: String,
    /// Its home device.
    pub device_id: String,
    /// Where its bytes are.
    pub resident_device_id: String,
    /// Its state.
    pub state: ModelState,
    /// Its bytes.
    pub size_bytes: u64,
    /// Active leases.
    pub leases: u64,
}

/// Everything `/metrics` shows, gathered under the locks at once and rendered without them.
#[derive(Debug, Clone)]
pub struct Telemetry {
    /// Every device.
    pub devices: Vec<DeviceTelemetry>,
    /// Every model.
    pub models: Vec<ModelTelemetry>,
    /// Transfers by status since the start: (status name, count).
    pub transfers: Vec<(&'static str, u64)>,
    /// Leases released because their time limit ran out, since the start.
    pub leases_expired_total: u64,
}

/// A history's samples as the protocol writes them: monotonic milliseconds turned into wall
/// time with one offset (`mono_now` read at `wall_now`).
fn wire_samples(
    samples: &[(u64, crate::managers::analytics::Sample)],
    mono_now: u64,
    wall_now: SystemTime,
) -> Vec<AnalyticsSample> {
    samples
        .iter()
        .map(|(mono, s)| {
            let back = Duration::from_millis(mono_now.saturating_sub(*mono));
            AnalyticsSample {
                at: Timestamp(wall_now.checked_sub(back).unwrap_or(wall_now)),
                used_memory: s.used_memory,
                allocated_bytes: s.allocated_bytes,
                reserved_bytes: s.reserved_bytes,
            }
        })
        .collect()
}

impl MemoryService {
    /// Sets the thresholds of `memory.optimization_recs`.
    pub fn with_advice_rules(mut self, rules: Rules) -> Self {
        self.rules = rules;
        self
    }

    /// Starts a thread that samples every device once a second for `memory.analytics`,
    /// until shutdown ([`MemoryService::shut_down`] stops it and waits for it).
    pub fn start_sampler(self: &Arc<Self>) {
        let service = Arc::downgrade(self);
        self.threads.spawn("memcoord-sampler", move |stop| {
            loop {
                let Some(s) = service.upgrade() else { break };
                if s.is_shutting_down() {
                    break;
                }
                s.sample();
                drop(s);
                // Sleep to the start of the next second of the monotonic clock.
                let ms = crate::backends::coarse_millis() % 1000;
                if stop.sleep(Duration::from_millis(1000 - ms + 5)) {
                    break;
                }
            }
        });
    }

    /// Samples every device once for `memory.analytics`, at the clock's now (what the
    /// sampler does each second; tests on a manual clock call it after moving the clock).
    pub fn sample(&self) {
        self.engine.lock().sample_history();
    }

    /// `memory.analytics`.
    pub fn analytics(&self, req: &AnalyticsRequest) -> Result<GetAnalyticsResponse, ProtocolError> {
        let mut e = self.engine.lock();
        let devices: Vec<usize> = match &req.device_id {
            Some(id) => vec![e.device_index(id)?],
            None => (0..e.device_count()).collect(),
        };
        // Monotonic milliseconds are turned into wall time with one offset per answer.
        let wall_now = self.now();
        let mut out = Vec::with_capacity(devices.len());
        for d in devices {
            let (report, mono_now) = e.history(d, req.window_seconds);
            out.push(MemoryAnalytics {
                device_id: e.device_id(d).to_string(),
                window_seconds: report.window_seconds,
                samples: wire_samples(&report.samples, mono_now, wall_now),
                allocation_size_histogram: report
                    .size_histogram
                    .iter()
                    .map(|&(le_bytes, count)| SizeBucket { le_bytes, count })
                    .collect(),
                allocation_latency_ms: LatencySummary {
                    p50: report.latency.p50,
                    p90: report.latency.p90,
                    p99: report.latency.p99,
                    max: report.latency.max,
                },
                allocations_per_second: report.allocations_per_second,
                peak_allocated_bytes: report.peak_allocated_bytes,
                bytes_by_purpose: PurposeBytes(e.bytes_by_purpose(
                    d,
                    PURPOSE_LIMIT,
                    OTHER_PURPOSES,
                )),
                allocation_count: report.allocations,
            });
        }
        Ok(GetAnalyticsResponse { devices: out })
    }

    /// `memory.optimization_recs`.
    pub fn optimization_recs(
        &self,
        req: &OptionalDeviceRequest,
    ) -> Result<OptimizationRecsResponse, ProtocolError> {
        let devices: Vec<usize> = {
            let e = self.engine.lock();
            match &req.device_id {
                Some(id) => vec![e.device_index(id)?],
                None => (0..e.device_count()).collect(),
            }
        };
        let now = self.now();
        let rules = &self.rules;
        let mut recs = Vec::new();
        for d in devices {
            let device_id = self.engine.lock().device_id(d).to_string();
            let (idle_models, leased) = {
                let models = self.models.lock();
                let idle: Vec<IdleModel> = models
                    .all()
                    .into_iter()
                    .filter(|m| {
                        m.resident_device_id == device_id
                            && m.state == ModelState::Loaded
                            && models.lease_count(&m.name) == 0
                            && now
                                .duration_since(m.last_used_at)
                                .is_ok_and(|idle| idle.as_secs_f64() >= rules.idle_model_seconds)
                    })
                    .map(|m| IdleModel {
                        name: m.name.clone(),
                        bytes: m.size_bytes,
                    })
                    .collect();
                let mut fixed = models.leased_allocations();
                fixed.extend(self.exported_allocations());
                (idle, fixed)
            };
            let mut e = self.engine.lock();
            let telemetry = e.telemetry(d, self.pressure_hold_ms);
            let defragmented_largest_free = (telemetry.fragmentation.fragmentation_percentage
                >= rules.fragmentation_percentage)
                .then(|| e.defragment_preview(d, &leased));
            let cpu_available = match e.device_index("cpu") {
                Ok(c) if c != d => Some(e.available(c)),
                _ => None,
            };
            let review_before = now
                .checked_sub(Duration::from_secs_f64(rules.review_persistent_seconds))
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let old_persistent = e
                .persistent_allocations(d, review_before, REVIEW_LIMIT)
                .into_iter()
                .map(|(id, bytes, touched_at)| OldPersistent {
                    allocation_id: id.hyphenated().to_string(),
                    bytes,
                    touched_at,
                })
                .collect();
            drop(e);
            recs.extend(advisor::advise(
                &Situation {
                    telemetry,
                    defragmented_largest_free,
                    idle_models,
                    cpu_available,
                    old_persistent,
                    now,
                },
                rules,
            ));
        }
        advisor::rank(&mut recs);
        Ok(OptimizationRecsResponse {
            recommendations: recs.into_iter().map(Into::into).collect(),
        })
    }

    /// Everything the dashboard shows, with memory maps of `buckets` buckets. Walks each
    /// device's allocations once (map and largest ones).
    pub fn dashboard_state(&self, buckets: usize) -> crate::protocol::DashboardState {
        use crate::protocol::{
            DashboardDevice, DashboardModel, MapBucket, MemoryMapView, TypeBytes,
        };
        let wall_now = self.now();
        let devices = {
            let mut e = self.engine.lock();
            (0..e.device_count())
                .map(|d| {
                    let map = e.memory_map(d, buckets);
                    let (report, mono_now) = e.history(d, 300);
                    DashboardDevice {
                        info: e.info(d).into(),
                        usage: e.usage(d).into(),
                        pressure: e.pressure(d, self.pressure_hold_ms).into(),
                        map: MemoryMapView {
                            arena_bytes: map.arena_bytes,
                            bucket_bytes: map.bucket_bytes,
                            buckets: map
                                .buckets
                                .iter()
                                .enumerate()
                                .map(|(i, types)| {
                                    let start = i as u64 * map.bucket_bytes;
                                    let len = map.bucket_bytes.min(map.arena_bytes - start);
                                    MapBucket {
                                        free: len.saturating_sub(types.iter().sum()),
                                        types: TypeBytes(*types),
                                    }
                                })
                                .collect(),
                        },
                        largest_allocations: (e.largest_allocations(d, 20).into_iter())
                            .map(Into::into)
                            .collect(),
                        samples: wire_samples(&report.samples, mono_now, wall_now),
                    }
                })
                .collect()
        };
        let models = {
            let models = self.models.lock();
            models
                .all()
                .into_iter()
                .map(|m| DashboardModel {
                    info: models.info(m).into(),
                    leases: models.lease_count(&m.name) as u64,
                })
                .collect()
        };
        crate::protocol::DashboardState {
            generated_at: Timestamp(wall_now),
            devices,
            models,
            transfers: (self.transfers.lock().recent(20).into_iter())
                .map(Into::into)
                .collect(),
        }
    }

    /// Everything `/metrics` shows. Holds the engine for one pass over the devices.
    pub fn telemetry(&self) -> Telemetry {
        let devices = {
            let mut e = self.engine.lock();
            (0..e.device_count())
                .map(|d| e.telemetry(d, self.pressure_hold_ms))
                .collect()
        };
        let models = {
            let models = self.models.lock();
            models
                .all()
                .into_iter()
                .map(|m| ModelTelemetry {
                    name: m.name.clone(),
                    device_id: m.device_id.clone(),
                    resident_device_id: m.resident_device_id.clone(),
                    state: m.state,
                    size_bytes: m.size_bytes,
                    leases: models.lease_count(&m.name) as u64,
                })
                .collect()
        };
        let transfers = self.transfers.lock().status_counts();
        Telemetry {
            devices,
            models,
            transfers,
            leases_expired_total: self.leases_expired_total(),
        }
    }
}
