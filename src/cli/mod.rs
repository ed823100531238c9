//! The read-only CLI views (`status`, `devices`, `allocs`, `models`, `pressure`, `top`): each
//! asks the protocol (in process, or a `memcoord serve` at `--url`) and prints a table for
//! people or the answer's JSON for scripts. All figures come from protocol answers, so what the
//! CLI shows is what a host sees.

use memcoord::dispatch::Dispatcher;
use memcoord::service::MemoryService;
use memcoord::units::format_bytes;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Where the answers come from.
pub enum Source {
    /// A service in this process (its own devices; no allocations but the ones it makes).
    Local(Arc<MemoryService>, Dispatcher),
    /// A running `memcoord serve`.
    Remote {
        /// `http://host:port`.
        url: String,
        /// Bearer token, if the server wants one.
        token: Option<String>,
        agent: ureq::Agent,
    },
}

impl Source {
    /// A source over a running server.
    pub fn remote(url: &str, token: Option<String>) -> Source {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Source::Remote {
            url: url.trim_end_matches('/').to_string(),
            token,
            agent,
        }
    }

    /// A source over an in-process service.
    pub fn local(service: Arc<MemoryService>) -> Source {
        let d = Dispatcher::new(Arc::clone(&service));
        Source::Local(service, d)
    }

    /// Carries out one action; its `data`, or the error's message.
    pub fn call(&self, action: &str, data: Value) -> Result<Value, String> {
        let line = json!({"request_id": "cli", "action": action, "data": data}).to_string();
        let answer: Value = match self {
            Source::Local(_, d) => {
                let mut out = Vec::new();
                if d.handle_line(line.as_bytes(), &mut out).is_some() {
                    return Err(format!("{action} would wait; ask a running server (--url)"));
                }
                serde_json::from_slice(&out).map_err(|e| format!("bad answer: {e}"))?
            }
            Source::Remote { url, token, agent } => {
                let mut req = agent
                    .post(format!("{url}/v1/command"))
                    .header("content-type", "application/json");
                if let Some(t) = token {
                    req = req.header("authorization", format!("Bearer {t}"));
                }
                let mut resp = req.send(line.as_str()).map_err(|e| format!("{url}: {e}"))?;
                let text = resp
                    .body_mut()
                    .read_to_string()
                    .map_err(|e| format!("{url}: {e}"))?;
                serde_json::from_str(&text)
                    .map_err(|e| format!("{url}: not a memcoord answer ({e}): {text}"))?
            }
        };
        if answer["success"] == true {
            Ok(answer["data"].clone())
        } else {
            Err(format!(
                "{}: {}",
                answer["error_code"].as_str().unwrap_or("ERROR"),
                answer["error_message"].as_str().unwrap_or("")
            ))
        }
    }

    /// Releases an in-process service.
    pub fn close(&self) {
        if let Source::Local(service, _) = self {
            service.close();
        }
    }
}

fn bytes(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".to_string(), format_bytes)
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
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
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.clone()));
        out.push('\n');
    }
    out
}

/// `memcoord devices`.
pub fn devices(src: &Source) -> Result<(Value, String), String> {
    let d = src.call("memory.list_devices", json!({}))?;
    let mut rows = Vec::new();
    let mut listed = Vec::new();
    for dev in d["devices"].as_array().into_iter().flatten() {
        let id = dev["device_id"].as_str().unwrap_or("");
        let usage = src.call("memory.get_usage", json!({"device_id": id}))?;
        listed.push(json!({"memory_info": dev, "usage_stats": usage}));
        let budget = usage["budget_bytes"].as_f64().unwrap_or(0.0);
        let charged = usage["allocated_bytes"].as_f64().unwrap_or(0.0)
            + usage["reservation_bytes"].as_f64().unwrap_or(0.0);
        rows.push(vec![
            id.to_string(),
            text(&dev["type"]),
            bytes(&dev["total_memory"]),
            bytes(&dev["used_memory"]),
            bytes(&usage["budget_bytes"]),
            bytes(&usage["allocated_bytes"]),
            bytes(&dev["available_memory"]),
            format!(
                "{} {:>5.1}%",
                bar(if budget > 0.0 { charged / budget } else { 0.0 }, 20),
                if budget > 0.0 {
                    charged / budget * 100.0
                } else {
                    0.0
                }
            ),
            format!(
                "{:.1}%",
                dev["fragmentation_percentage"].as_f64().unwrap_or(0.0)
            ),
            text(&dev["health"]),
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
        None => src.call("memory.list_devices", json!({}))?["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["device_id"].as_str().map(str::to_string))
            .collect(),
    };
    let mut all = Vec::new();
    let mut rows = Vec::new();
    let mut total = 0;
    for id in ids {
        let page = src.call(
            "memory.get_allocations",
            json!({"device_id": id, "limit": limit}),
        )?;
        total += page["total_count"].as_u64().unwrap_or(0);
        for a in page["allocations"].as_array().into_iter().flatten() {
            rows.push(vec![
                text(&a["allocation_id"]),
                text(&a["device_id"]),
                text(&a["allocation_type"]),
                bytes(&a["size_bytes"]),
                text(&a["purpose"]),
                text(&a["owner"]),
                if a["persistent"] == true { "yes" } else { "" }.to_string(),
                text(&a["created_at"]),
            ]);
            all.push(a.clone());
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

/// `memcoord models`.
pub fn models(src: &Source) -> Result<(Value, String), String> {
    let m = src.call("memory.model_status", json!({}))?;
    let rows: Vec<Vec<String>> = m["models"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            vec![
                text(&m["model_name"]),
                text(&m["state"]),
                text(&m["device_id"]),
                text(&m["resident_device_id"]),
                bytes(&m["size_bytes"]),
                text(&m["tensor_count"]),
                text(&m["last_used_at"]),
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
        ],
        &rows,
    );
    out.push_str(&format!(
        "model bytes {} (budget {})\n",
        bytes(&m["model_bytes"]),
        bytes(&m["model_budget_bytes"])
    ));
    Ok((m, out))
}

/// `memcoord pressure`.
pub fn pressure(src: &Source) -> Result<(Value, String), String> {
    let p = src.call("memory.get_pressure", json!({}))?;
    let rows: Vec<Vec<String>> = p["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            vec![
                text(&d["device_id"]),
                text(&d["level"]),
                format!("{:.1}%", d["usage_percentage"].as_f64().unwrap_or(0.0)),
                bytes(&d["available_memory"]),
                text(&d["waiting_requests"]),
                format!(
                    "{:.0} / {:.0} ms",
                    d["stall_ms_10s"].as_f64().unwrap_or(0.0),
                    d["stall_ms_60s"].as_f64().unwrap_or(0.0)
                ),
                text(&d["failed_allocations_60s"]),
                format!(
                    "{}/s",
                    format_signed(d["trend_bytes_per_second"].as_f64().unwrap_or(0.0))
                ),
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
    Ok((p, out))
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
