//! The read-only CLI views (`status`, `devices`, `allocs`, `models`, `sessions`, `pressure`,
//! `top`): each
//! asks the protocol (in process, or a `memcoord serve` at `--url`) and prints a table for
//! people or the answer's JSON for scripts. All figures come from protocol answers, so what the
//! CLI shows is what a host sees.

use memcoord::api::actions::{
    get_allocations::GetAllocations, get_pressure::GetPressure, get_usage::GetUsage,
    list_devices::ListDevices, list_sessions::ListSessions, model_status::ModelStatus,
};
use memcoord::api::client::Client;
use memcoord::api::{
    ActionSpec, DeviceRequest, GetAllocationsRequest, ModelStatusRequest, OptionalDeviceRequest,
};
use memcoord::protocol::{LeaseInfo, Timestamp};
use memcoord::service::MemoryService;
use memcoord::units::format_bytes;
use serde::Serialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Where the answers come from: a typed client of a service in this process (its own
/// devices; no allocations but the ones it makes) or of a running `memcoord serve`.
pub struct Source {
    client: Client,
}

impl Source {
    /// A source over a running server.
    pub fn remote(url: &str, token: Option<String>) -> Source {
        Source {
            client: Client::http(url, token),
        }
    }

    /// A source over an in-process service.
    pub fn local(service: Arc<MemoryService>) -> Source {
        Source {
            client: Client::local(service),
        }
    }

    /// Carries out the action `A`; its typed answer, or the error for people.
    pub fn ask<A: ActionSpec>(&self, request: &A::Request) -> Result<A::Response, String> {
        self.client.ask::<A>(request).map_err(|e| e.to_string())
    }

    /// Releases an in-process service.
    pub fn close(&self) {
        if let Some(service) = self.client.service() {
            service.close();
        }
    }
}

/// An answer as JSON, for `--json`.
fn to_json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn bytes(v: u64) -> String {
    format_bytes(v)
}

fn time(t: &Timestamp) -> String {
    String::from_utf8_lossy(&t.rfc3339_millis()).into_owned()
}

fn bar(fraction: f64, width: usize) -> String {
    let filled = (fraction.clamp(0.0, 1.0) * width as f64).round() as usize;
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// A table with a header, columns sized to their contents.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(
        header
            .iter()
            .map(std::string::ToString::to_string)
            .collect(),
    );
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.clone()));
        out.push('\n');
    }
    out
}

/// `memcoord devices`.
pub fn devices(src: &Source) -> Result<(Value, String), String> {
    let d = src.ask::<ListDevices>(&())?;
    let mut rows = Vec::new();
    let mut listed = Vec::new();
    for dev in &d.devices {
        let usage = src.ask::<GetUsage>(&DeviceRequest {
            device_id: dev.device_id.clone(),
        })?;
        listed.push(json!({"memory_info": to_json(dev), "usage_stats": to_json(&usage)}));
        let budget = usage.budget_bytes as f64;
        let charged = usage.allocated_bytes as f64 + usage.reservation_bytes as f64;
        rows.push(vec![
            dev.device_id.clone(),
            dev.memory_type.to_string(),
            bytes(dev.total_memory),
            bytes(dev.used_memory),
            bytes(usage.budget_bytes),
            bytes(usage.allocated_bytes),
            bytes(dev.available_memory),
            format!(
                "{} {:>5.1}%",
                bar(if budget > 0.0 { charged / budget } else { 0.0 }, 20),
                if budget > 0.0 {
                    charged / budget * 100.0
                } else {
                    0.0
                }
            ),
            format!("{:.1}%", dev.fragmentation_percentage),
            dev.health.to_string(),
        ]);
    }
    let out = table(
        &[
            "DEVICE",
            "TYPE",
            "CAPACITY",
            "USED",
            "BUDGET",
            "ALLOCATED",
            "AVAILABLE",
            "BUDGET USE",
            "FRAG",
            "HEALTH",
        ],
        &rows,
    );
    Ok((json!({ "devices": listed }), out))
}

/// `memcoord allocs`.
pub fn allocs(src: &Source, device: Option<&str>, limit: u64) -> Result<(Value, String), String> {
    let ids: Vec<String> = match device {
        Some(d) => vec![d.to_string()],
        None => src
            .ask::<ListDevices>(&())?
            .devices
            .into_iter()
            .map(|d| d.device_id)
            .collect(),
    };
    let mut all = Vec::new();
    let mut rows = Vec::new();
    let mut total = 0;
    for id in ids {
        let page = src.ask::<GetAllocations>(&GetAllocationsRequest {
            device_id: id,
            allocation_type: None,
            purpose: None,
            owner: None,
            tenant: None,
            client_pid: None,
            offset: 0,
            limit,
        })?;
        total += page.total_count;
        for a in &page.allocations {
            rows.push(vec![
                a.allocation_id.clone(),
                a.device_id.clone(),
                a.allocation_type.to_string(),
                bytes(a.size_bytes),
                a.purpose.clone(),
                a.owner.clone(),
                a.client_pid.map(|p| p.to_string()).unwrap_or_default(),
                if a.persistent { "yes" } else { "" }.to_string(),
                time(&a.created_at),
            ]);
            all.push(to_json(a));
        }
    }
    let mut out = table(
        &[
            "ID",
            "DEVICE",
            "TYPE",
            "SIZE",
            "PURPOSE",
            "OWNER",
            "PID",
            "PERSISTENT",
            "CREATED",
        ],
        &rows,
    );
    if (rows.len() as u64) < total {
        out.push_str(&format!("({} of {total} shown; --limit)\n", rows.len()));
    }
    Ok((json!({"total_count": total, "allocations": all}), out))
}

/// When a model's leases run out: `-` with none, `never` while one has no time limit, else
/// the latest deadline (the model is held until then unless they are renewed).
fn lease_expiry(leases: &[LeaseInfo]) -> String {
    if leases.is_empty() {
        return "-".to_string();
    }
    if leases.iter().any(|l| l.expires_at.is_none()) {
        return "never".to_string();
    }
    leases
        .iter()
        .filter_map(|l| l.expires_at.as_ref())
        .max()
        .map_or_else(|| "-".to_string(), time)
}

/// `memcoord models`.
pub fn models(src: &Source) -> Result<(Value, String), String> {
    let m = src.ask::<ModelStatus>(&ModelStatusRequest {
        device_id: None,
        model_name: None,
    })?;
    let rows: Vec<Vec<String>> = m
        .models
        .iter()
        .map(|m| {
            vec![
                m.model_name.clone(),
                m.state.to_string(),
                m.device_id.clone(),
                m.resident_device_id.clone(),
                bytes(m.size_bytes),
                m.tensor_count.to_string(),
                time(&m.last_used_at),
                m.leases.len().to_string(),
                lease_expiry(&m.leases),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "MODEL",
            "STATE",
            "DEVICE",
            "RESIDENT",
            "SIZE",
            "TENSORS",
            "LAST USED",
            "LEASES",
            "LEASE EXPIRES",
        ],
        &rows,
    );
    out.push_str(&format!(
        "model bytes {} (budget {})\n",
        bytes(m.model_bytes),
        bytes(m.model_budget_bytes)
    ));
    Ok((to_json(&m), out))
}

/// `memcoord sessions`: every live session (stdio, each Unix-socket connection), per
/// process, with what it holds.
pub fn sessions(src: &Source) -> Result<(Value, String), String> {
    let s = src.ask::<ListSessions>(&())?;
    let rows: Vec<Vec<String>> = s
        .sessions
        .iter()
        .map(|s| {
            vec![
                s.session_id.clone(),
                s.client_pid.map(|p| p.to_string()).unwrap_or_default(),
                s.transport.clone(),
                s.tenant.clone(),
                s.allocation_count.to_string(),
                bytes(s.allocated_bytes),
                s.lease_count.to_string(),
                s.export_count.to_string(),
                time(&s.started_at),
            ]
        })
        .collect();
    let out = table(
        &[
            "SESSION",
            "PID",
            "TRANSPORT",
            "TENANT",
            "ALLOCS",
            "BYTES",
            "LEASES",
            "EXPORTS",
            "STARTED",
        ],
        &rows,
    );
    Ok((to_json(&s), out))
}

/// `memcoord pressure`.
pub fn pressure(src: &Source) -> Result<(Value, String), String> {
    let p = src.ask::<GetPressure>(&OptionalDeviceRequest { device_id: None })?;
    let rows: Vec<Vec<String>> = p
        .devices
        .iter()
        .map(|d| {
            vec![
                d.device_id.clone(),
                d.level.to_string(),
                format!("{:.1}%", d.usage_percentage),
                bytes(d.available_memory),
                d.waiting_requests.to_string(),
                format!("{:.0} / {:.0} ms", d.stall_ms_10s, d.stall_ms_60s),
                d.failed_allocations_60s.to_string(),
                format!("{}/s", format_signed(d.trend_bytes_per_second)),
            ]
        })
        .collect();
    let out = table(
        &[
            "DEVICE",
            "LEVEL",
            "USAGE",
            "AVAILABLE",
            "WAITING",
            "STALL 10s/60s",
            "FAILED 60s",
            "TREND",
        ],
        &rows,
    );
    Ok((to_json(&p), out))
}

fn format_signed(v: f64) -> String {
    let sign = if v < 0.0 { "-" } else { "+" };
    format!("{sign}{}", format_bytes(v.abs() as u64))
}

/// `memcoord status`: devices, pressure and models in one screen.
pub fn status(src: &Source) -> Result<(Value, String), String> {
    let (d, devices) = devices(src)?;
    let (p, pressure) = pressure(src)?;
    let (m, models) = models(src)?;
    let mut out = devices;
    out.push('\n');
    out.push_str(&pressure);
    if m["models"].as_array().is_some_and(|a| !a.is_empty()) {
        out.push('\n');
        out.push_str(&models);
    }
    Ok((
        json!({"devices": d["devices"], "pressure": p["devices"], "models": m["models"]}),
        out,
    ))
}

/// One frame of `memcoord top`: devices with budget bars, pressure, the largest allocations
/// and running transfers.
pub fn top_frame(src: &Source) -> Result<String, String> {
    let (_, devices) = devices(src)?;
    let (_, pressure) = pressure(src)?;
    let mut out = format!(
        "memcoord top — {} (Ctrl-C quits)\n\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    out.push_str(&devices);
    out.push('\n');
    out.push_str(&pressure);
    let (_, allocs) = allocs(src, None, 10)?;
    out.push_str("\nOLDEST ALLOCATIONS (10 per device)\n");
    out.push_str(&allocs);
    let (m, models) = models(src)?;
    if m["models"].as_array().is_some_and(|a| !a.is_empty()) {
        out.push('\n');
        out.push_str(&models);
    }
    Ok(out)
}

/// `memcoord top`: redraws every `interval` until interrupted (or `iterations` frames).
pub fn top(src: &Source, interval: Duration, iterations: Option<u64>) -> Result<(), String> {
    use std::io::Write;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut n = 0;
    loop {
        let frame = top_frame(src)?;
        let mut stdout = std::io::stdout().lock();
        if tty {
            // Home, clear screen.
            let _ = write!(stdout, "\x1b[H\x1b[2J");
        }
        let _ = write!(stdout, "{frame}");
        let _ = stdout.flush();
        n += 1;
        if iterations.is_some_and(|i| n >= i) {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}
