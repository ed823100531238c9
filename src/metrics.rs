//! Prometheus metrics: the service's [`Telemetry`] rendered in the OpenMetrics text format by
//! prometheus-client. Names start with `memcoord_`, values are in base units (bytes, seconds),
//! ratios are 0–1, only counters end in `_total`, and labels are bounded (`device`, `type`,
//! `model`, `state`, `direction`, `status`, `version`; never an id).
//!
//! Each scrape takes one snapshot (the engine is held for one pass over the devices, never
//! over the allocations) and renders it after the locks are released.

use crate::managers::analytics::DURATION_BUCKETS;
use crate::protocol::{MemoryAllocationType, ModelState};
use crate::service::Telemetry;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`to_prometheus_text`]'s output.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
struct Snapshot(Telemetry);

/// A histogram given as its buckets, for a collector.
struct ConstHistogram {
    sum: f64,
    count: u64,
    /// (upper bound, count in this bucket alone), the last +Inf.
    buckets: Vec<(f64, u64)>,
}

impl TypedMetric for ConstHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<Vec<(String, String)>>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One metric family: its descriptor and its labelled values.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    values: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let values: Vec<(Labels, M)> = values.into_iter().collect();
    if values.is_empty() {
        return Ok(());
    }
    let metric_type = values[0].1.metric_type();
    let mut family = encoder.encode_descriptor(name, help, unit.as_ref(), metric_type)?;
    for (labels, metric) in &values {
        metric.encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn device(id: &str) -> Labels {
    vec![("device", id.to_string())]
}

fn ratio(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        (part / whole).clamp(0.0, 1.0)
    } else {
        0.0
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let t = &self.0;
        let devs = &t.devices;
        let gauge_u = |v: u64| ConstGauge::new(v as i64);
        let bytes = Some(Unit::Bytes);

        family(
            &mut e,
            "device_memory_capacity",
            "The device's capacity (RAM: MemTotal; VRAM: the driver's total).",
            bytes.clone(),
            devs.iter()
                .map(|d| (device(&d.device_id), gauge_u(d.capacity_bytes))),
        )?;
        family(
            &mut e,
            "device_memory_used",
            "Memory in use on the device as the device reports it, by every process.",
            bytes.clone(),
            devs.iter()
                .map(|d| (device(&d.device_id), gauge_u(d.used_bytes))),
        )?;
        family(
            &mut e,
            "budget",
            "The most bytes (allocations plus reservations) memcoord may hold on the device.",
            bytes.clone(),
            devs.iter()
                .map(|d| (device(&d.device_id), gauge_u(d.budget_bytes))),
        )?;
        family(
            &mut e,
            "allocated",
            "Bytes of live allocations that hold memory, by allocation type.",
            bytes.clone(),
            devs.iter().flat_map(|d| {
                MemoryAllocationType::ALL
                    .iter()
                    .filter(|k| **k != MemoryAllocationType::Reservation)
                    .map(|k| {
                        (
                            vec![
                                ("device", d.device_id.clone()),
                                ("type", k.name().to_string()),
                            ],
                            gauge_u(d.bytes_by_type[k.value() as usize]),
                        )
                    })
            }),
        )?;
        family(
            &mut e,
            "reservation",
            "Bytes of live Reservations (charged to the budget, holding no memory).",
            bytes.clone(),
            devs.iter()
                .map(|d| (device(&d.device_id), gauge_u(d.reservation_bytes))),
        )?;
        family(
            &mut e,
            "reserved",
            "Bytes memcoord holds from the device (allocations, cache, padding, fragmentation).",
            bytes.clone(),
            devs.iter()
                .map(|d| (device(&d.device_id), gauge_u(d.reserved_bytes))),
        )?;
        family(
            &mut e,
            "available",
            "What a memory.allocate on the device could obtain now.",
            bytes.clone(),
            devs.iter()
                .map(|d| (device(&d.device_id), gauge_u(d.fragmentation.free_bytes))),
        )?;
        family(
            &mut e,
            "largest_free_block",
            "The largest allocation that would succeed now without waiting or moving anything.",
            bytes.clone(),
            devs.iter().map(|d| {
                (
                    device(&d.device_id),
                    gauge_u(d.fragmentation.largest_free_block_bytes),
                )
            }),
        )?;
        family(
            &mut e,
            "peak_allocated",
            "The most bytes allocated at once since the start.",
            bytes.clone(),
            devs.iter()
                .map(|d| (device(&d.device_id), gauge_u(d.peak_allocated_bytes))),
        )?;
        family(
            &mut e,
            "tenant_allocated",
            "Bytes each tenant holds on the device: its allocations (Reservations included) and \
             the models it loaded; what its quota is checked against.",
            bytes.clone(),
            devs.iter().flat_map(|d| {
                d.tenant_bytes.iter().map(|(tenant, b)| {
                    (
                        vec![("tenant", tenant.clone()), ("device", d.device_id.clone())],
                        gauge_u(*b),
                    )
                })
            }),
        )?;
        family(
            &mut e,
            "model",
            "Bytes of model weights resident on the device.",
            bytes.clone(),
            devs.iter()
                .map(|d| (device(&d.device_id), gauge_u(d.model_bytes))),
        )?;
        family(
            &mut e,
            "fragmentation",
            "Share of the free memory that one request cannot get (1 - largest free block / free).",
            Some(Unit::Other("ratio".into())),
            devs.iter().map(|d| {
                (
                    device(&d.device_id),
                    ConstGauge::new(d.fragmentation.fragmentation_percentage / 100.0),
                )
            }),
        )?;
        family(
            &mut e,
            "budget_usage",
            "(allocated + reservation bytes) / budget.",
            Some(Unit::Other("ratio".into())),
            devs.iter().map(|d| {
                (
                    device(&d.device_id),
                    ConstGauge::new(ratio(
                        (d.allocated_bytes + d.reservation_bytes) as f64,
                        d.budget_bytes as f64,
                    )),
                )
            }),
        )?;
        family(
            &mut e,
            "pressure_level",
            "Memory pressure: 0 None, 1 Low, 2 Moderate, 3 High, 4 Critical.",
            None,
            devs.iter().map(|d| {
                (
                    device(&d.device_id),
                    ConstGauge::new(d.pressure.level.value()),
                )
            }),
        )?;
        family(
            &mut e,
            "waiting_requests",
            "Requests waiting for memory now.",
            None,
            devs.iter()
                .map(|d| (device(&d.device_id), gauge_u(d.pressure.waiting_requests))),
        )?;
        family(
            &mut e,
            "live_allocations",
            "Live allocations, by type.",
            None,
            devs.iter().flat_map(|d| {
                MemoryAllocationType::ALL.iter().map(|k| {
                    (
                        vec![
                            ("device", d.device_id.clone()),
                            ("type", k.name().to_string()),
                        ],
                        gauge_u(d.live_by_type[k.value() as usize]),
                    )
                })
            }),
        )?;
        family(
            &mut e,
            "pressure_stall",
            "Seconds during which at least one request waited for memory (as Linux PSI counts).",
            Some(Unit::Seconds),
            devs.iter().map(|d| {
                (
                    device(&d.device_id),
                    ConstCounter::new(d.stall_seconds_total),
                )
            }),
        )?;
        family(
            &mut e,
            "allocations",
            "Allocations made, by type (models' tensors and transfer destinations included).",
            None,
            devs.iter().flat_map(|d| {
                MemoryAllocationType::ALL.iter().map(|k| {
                    (
                        vec![
                            ("device", d.device_id.clone()),
                            ("type", k.name().to_string()),
                        ],
                        ConstCounter::new(d.total_by_type[k.value() as usize]),
                    )
                })
            }),
        )?;
        family(
            &mut e,
            "deallocations",
            "Allocations freed (or moved off the device).",
            None,
            devs.iter().map(|d| {
                (
                    device(&d.device_id),
                    ConstCounter::new(d.deallocations_total),
                )
            }),
        )?;
        family(
            &mut e,
            "allocation_failures",
            "memory.allocate requests answered OUT_OF_MEMORY.",
            None,
            devs.iter()
                .map(|d| (device(&d.device_id), ConstCounter::new(d.failures_total))),
        )?;
        family(
            &mut e,
            "transfer",
            "Bytes transferred onto (in) or off (out) the device.",
            bytes.clone(),
            devs.iter().flat_map(|d| {
                [
                    ("in", d.transferred_in_bytes),
                    ("out", d.transferred_out_bytes),
                ]
                .map(|(direction, v)| {
                    (
                        vec![
                            ("device", d.device_id.clone()),
                            ("direction", direction.to_string()),
                        ],
                        ConstCounter::new(v),
                    )
                })
            }),
        )?;
        family(
            &mut e,
            "transfers",
            "Transfers that ended, by status.",
            None,
            t.transfers
                .iter()
                .filter(|(status, _)| *status != "Running")
                .map(|(status, n)| (vec![("status", status.to_string())], ConstCounter::new(*n))),
        )?;
        family(
            &mut e,
            "transfers_running",
            "Transfers in progress.",
            None,
            t.transfers
                .iter()
                .filter(|(status, _)| *status == "Running")
                .map(|(_, n)| (Labels::new(), gauge_u(*n))),
        )?;
        family(
            &mut e,
            // In seconds, named so, but without a UNIT line: some OpenMetrics parsers accept
            // units on counters and gauges only.
            "allocation_duration_seconds",
            "How long memory.allocate requests took, waiting included.",
            None,
            devs.iter().map(|d| {
                // Per-bucket counts: the encoder makes them cumulative.
                let buckets = DURATION_BUCKETS
                    .iter()
                    .copied()
                    .chain([f64::INFINITY])
                    .zip(d.durations.counts)
                    .collect();
                (
                    device(&d.device_id),
                    ConstHistogram {
                        sum: d.durations.sum_seconds,
                        count: d.durations.count,
                        buckets,
                    },
                )
            }),
        )?;
        family(
            &mut e,
            "model_resident",
            "Bytes of a model's weights, on the device that holds them now.",
            bytes.clone(),
            t.models.iter().map(|m| {
                (
                    vec![
                        ("model", m.name.clone()),
                        ("device", m.resident_device_id.clone()),
                    ],
                    gauge_u(m.size_bytes),
                )
            }),
        )?;
        family(
            &mut e,
            "model_leases",
            "Active leases of a model.",
            None,
            t.models
                .iter()
                .map(|m| (vec![("model", m.name.clone())], gauge_u(m.leases))),
        )?;
        family(
            &mut e,
            "leases_expired",
            "Model leases released because their time limit (ttl_seconds) ran out.",
            None,
            [(Labels::new(), ConstCounter::new(t.leases_expired_total))],
        )?;
        family(
            &mut e,
            "model_state",
            "1 for the state a model is in.",
            None,
            t.models.iter().flat_map(|m| {
                ModelState::ALL.iter().map(|s| {
                    (
                        vec![("model", m.name.clone()), ("state", s.name().to_string())],
                        ConstGauge::new(i64::from(m.state == *s)),
                    )
                })
            }),
        )?;
        // A gauge of 1 with the version as a label, as Prometheus' own `prometheus_build_info`
        // (the OpenMetrics `info` type is not understood by Prometheus' text parser).
        family(
            &mut e,
            "build_info",
            "memcoord's version (always 1).",
            None,
            [(
                vec![("version", env!("CARGO_PKG_VERSION").to_string())],
                ConstGauge::new(1i64),
            )],
        )?;
        Ok(())
    }
}

/// The OpenMetrics text of a snapshot (ending in `# EOF`).
pub fn render(telemetry: Telemetry) -> String {
    let mut registry = Registry::with_prefix("memcoord");
    registry.register_collector(Box::new(Snapshot(telemetry)));
    let mut out = String::with_capacity(16 << 10);
    // Writing into a String cannot fail; an error here would be an encoder bug.
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
        out.push_str("# EOF\n");
    }
    out
}

/// The same metrics in Prometheus' older text format (0.0.4), for scrapers and tools that do
/// not ask for OpenMetrics (`promtool check metrics`, plain `curl`). prometheus-client writes
/// OpenMetrics only; the two differ in three ways, undone here: a counter's HELP and TYPE
/// name it with its `_total`, and there are no `# UNIT` or `# EOF` lines.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counters_with_total() {
        let om = "# HELP x_total_thing a\n# HELP c help me\n# TYPE c counter\n# UNIT c bytes\nc_total 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP x_total_thing a\n# HELP c_total help me\n# TYPE c_total counter\nc_total 1\n"
        );
    }
}
