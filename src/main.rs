//! The `memcoord` command: `worker` (the stdio protocol), `status` (a table of devices).

use clap::{Args, Parser, Subcommand};

mod cli;
use memcoord::config::{ConfigError, Settings};
use memcoord::dispatch::Dispatcher;
use memcoord::managers::AllocationEngine;
use memcoord::managers::replay;
use memcoord::runtime::{Shutdown, Threads};
use memcoord::service::MemoryService;
use memcoord::transport::stdio::{self, WorkerOptions};
use memcoord::units::format_bytes;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "memcoord",
    version,
    about = "The memory coordinator for ML inference hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer the memory protocol: NDJSON requests on stdin, responses on stdout.
    Worker {
        #[command(flatten)]
        service: ServiceArgs,
        /// Lines longer than this many bytes are answered REQUEST_TOO_LARGE.
        #[arg(long, value_name = "BYTES")]
        max_line_bytes: Option<usize>,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464; port 0 picks
        /// one, printed on stderr). Any address but loopback needs --token-file.
        #[arg(long, value_name = "ADDR:PORT")]
        metrics_addr: Option<String>,
        /// A file holding the bearer token /metrics then requires (/healthz does not).
        #[arg(long, value_name = "FILE", requires = "metrics_addr")]
        token_file: Option<PathBuf>,
        #[command(flatten)]
        unix: UnixArgs,
    },
    /// Serve the protocol over HTTP: POST /v1/command, REST routes, the dashboard at /,
    /// /metrics, /healthz and /v1/openapi.json.
    Serve {
        #[command(flatten)]
        service: ServiceArgs,
        /// The address to listen on. Any address but loopback needs --token-file. Default
        /// 127.0.0.1:8080, unless --unix is given alone: then only the socket is served.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<String>,
        #[command(flatten)]
        unix: UnixArgs,
        /// A file holding the bearer token every route but /healthz then requires.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Request bodies longer than this many bytes are answered REQUEST_TOO_LARGE.
        #[arg(long, value_name = "BYTES")]
        max_body_bytes: Option<usize>,
        /// Seconds a client may take to send a request's header; also how long an idle
        /// keep-alive connection stays open. Past it the connection is closed.
        #[arg(long, value_name = "SECONDS", default_value_t = memcoord::transport::http::DEFAULT_HEADER_TIMEOUT.as_secs_f64())]
        header_timeout_seconds: f64,
        /// Seconds a client may take to send a request's body, after its header. Past it the
        /// request is answered INVALID_REQUEST and the connection closed.
        #[arg(long, value_name = "SECONDS", default_value_t = memcoord::transport::http::DEFAULT_BODY_TIMEOUT.as_secs_f64())]
        body_timeout_seconds: f64,
    },
    /// Replay an allocation trace (one JSON op a line) through the engine and report speed,
    /// peak allocated and reserved bytes, and fragmentation at the peak.
    Replay {
        /// The trace file.
        trace: PathBuf,
        /// The device to replay on.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Multiply every size by this (0.0625 divides by 16).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Defragment every N operations.
        #[arg(long, value_name = "N")]
        defragment_every: Option<u64>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        devices: DeviceArgs,
    },
    /// Devices, pressure and models at a glance.
    Status {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Devices: capacity, use, budget, fragmentation, health.
    Devices {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Live allocations, oldest first.
    Allocs {
        #[command(flatten)]
        target: TargetArgs,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// The most allocations listed per device.
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// Models: state, home and resident device, bytes.
    Models {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Sessions (stdio, Unix-socket connections) per process, with what each holds.
    Sessions {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Memory pressure per device.
    Pressure {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// A live view, redrawn every interval (like nvtop).
    Top {
        #[command(flatten)]
        target: TargetArgs,
        /// Seconds between frames.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Stop after this many frames.
        #[arg(long)]
        iterations: Option<u64>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Where a view's figures come from: a running server (`--url`), else a service in this
/// process over the devices the options describe.
#[derive(Args)]
struct TargetArgs {
    /// A running `memcoord serve`, e.g. http://127.0.0.1:7077.
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// The server's bearer token, read from this file.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Print the answer as JSON for scripts.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    devices: DeviceArgs,
}

impl TargetArgs {
    fn source(&self) -> Result<cli::Source, String> {
        match &self.url {
            Some(url) => {
                let token = match &self.token_file {
                    Some(p) => Some(
                        std::fs::read_to_string(p)
                            .map_err(|e| format!("--token-file {}: {e}", p.display()))?
                            .trim()
                            .to_string(),
                    ),
                    None => None,
                };
                Ok(cli::Source::remote(url, token))
            }
            None => {
                let settings = self.devices.settings().map_err(|e| e.to_string())?;
                Ok(cli::Source::local(Arc::new(MemoryService::new(
                    settings.devices().map_err(|e| e.to_string())?,
                ))))
            }
        }
    }

    /// Runs a view and prints it.
    fn show(
        &self,
        view: impl FnOnce(&cli::Source) -> Result<(serde_json::Value, String), String>,
    ) -> Result<(), String> {
        let src = self.source()?;
        let result = view(&src);
        src.close();
        let (json, table) = result?;
        if self.json {
            println!("{json}");
        } else {
            print!("{table}");
        }
        Ok(())
    }

    /// [`show`](Self::show), and for a table of this process's own devices, which default
    /// budgets the cgroup's memory limit capped.
    fn show_devices(
        &self,
        view: impl FnOnce(&cli::Source) -> Result<(serde_json::Value, String), String>,
    ) -> Result<(), String> {
        self.show(view)?;
        if self.url.is_none()
            && !self.json
            && let Some(note) = self.devices.settings().ok().and_then(|s| s.limit_note())
        {
            println!("\nnote: {note}");
        }
        Ok(())
    }
}

/// The Unix-domain socket served beside stdio or HTTP (worker and serve alike).
#[derive(Args)]
struct UnixArgs {
    /// Also serve the protocol on this Unix-domain socket: NDJSON as on stdio, each
    /// connection a session whose holdings are released when it ends. Removed at exit.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// The socket file's mode, in octal (default 600: only this user may connect).
    #[arg(long, value_name = "OCTAL", requires = "unix", default_value = "600")]
    unix_mode: String,
}

impl UnixArgs {
    /// Binds the socket, if one was asked for.
    fn bind(
        &self,
        dispatcher: &Dispatcher,
        runtime: &tokio::runtime::Runtime,
        options: &WorkerOptions,
    ) -> Result<Option<memcoord::transport::unix::UnixServer>, String> {
        let Some(path) = &self.unix else {
            return Ok(None);
        };
        let mode = memcoord::transport::unix::parse_mode(&self.unix_mode)?;
        let server = memcoord::transport::unix::UnixServer::bind(
            path,
            mode,
            dispatcher,
            runtime.handle(),
            options,
        )
        .map_err(|e| format!("--unix: {e}"))?;
        eprintln!("memcoord: serving on unix:{}", path.display());
        Ok(Some(server))
    }
}

/// What the service is made of and how it behaves (worker and serve alike).
#[derive(Args)]
struct ServiceArgs {
    #[command(flatten)]
    devices: DeviceArgs,
    /// The folder `memory.model_load` paths are relative to (and must stay inside).
    #[arg(long, value_name = "DIR", default_value = ".")]
    model_root: PathBuf,
    /// The most bytes of models a device holds, e.g. `cuda:0=40GiB` (repeatable).
    /// Default: the device's whole budget.
    #[arg(long = "model-budget", value_name = "DEVICE=SIZE")]
    model_budgets: Vec<String>,
    /// Seconds a lower memory-pressure level must hold before it is reported.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pressure_hold_seconds: f64,
    /// Keep persistent `shm` allocations in this directory so they outlive the worker (even
    /// killed): the next worker with the same directory adopts them (same ids, bytes, handles).
    /// Made 0700 (its files 0600); an existing one open to others is tightened to 0700, one
    /// that others may write to is refused.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The most requests that may wait for memory on one device at once; more are answered
    /// OUT_OF_MEMORY at once.
    #[arg(long, value_name = "N", default_value_t = memcoord::service::DEFAULT_MAX_WAITING)]
    max_waiting: u64,
    /// The most live allocations one device may hold (at least 1).
    #[arg(long, value_name = "N", default_value_t = memcoord::managers::allocations::DEFAULT_MAX_ALLOCATIONS,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_allocations: u64,
    /// The most requests one client may have in flight (answered later or running in the
    /// background): per stdio session, per HTTP client address. More are answered
    /// TOO_MANY_REQUESTS at once.
    #[arg(long, value_name = "N", default_value_t = memcoord::transport::stdio::DEFAULT_MAX_IN_FLIGHT)]
    max_in_flight: usize,
    /// After answering, how long (µs) a stdin or Unix-socket reader watches for the client's
    /// next request before it sleeps in `read`: a client that sends one request at a time
    /// then finds it awake. It spins only while its client is that quick, and at most a
    /// quarter of the cores spin at once; 0 turns it off (every wait sleeps at once).
    #[arg(long, value_name = "MICROSECONDS", default_value_t = memcoord::transport::spin::DEFAULT_SPIN_MICROS)]
    spin_us: u64,
    #[command(flatten)]
    advice: AdviceArgs,
}

/// What [`ServiceArgs::start`] starts.
type Started = (Settings, Arc<MemoryService>, Threads);

impl ServiceArgs {
    /// The settings, a running service (keep-alive sweeper and sampler started, owned by the
    /// service; `token`, --token-file's, is tenant `admin`) and the threads of this command (a
    /// progress display), stopped when dropped.
    fn start(&self, token: Option<&str>) -> Result<Started, String> {
        let mut settings = self.devices.settings().map_err(|e| e.to_string())?;
        let tenants = memcoord::domain::Tenants::new(settings.tenants.clone(), token)
            .map_err(|e| format!("tenants: {e}"))?;
        if let Some(dir) = &self.state_dir {
            memcoord::service::create_private_dir(dir)
                .map_err(|e| format!("--state-dir {}: {e}", dir.display()))?;
            settings.state_dir = Some(dir.clone());
        }
        let mut service = MemoryService::new(settings.devices().map_err(|e| e.to_string())?)
            .with_model_root(self.model_root.clone())
            .with_pressure_hold(std::time::Duration::from_secs_f64(
                self.pressure_hold_seconds.clamp(0.0, 3600.0),
            ))
            .with_advice_rules(self.advice.rules()?)
            .with_max_waiting(self.max_waiting)
            .with_max_allocations(self.max_allocations)
            .with_tenants(tenants);
        for spec in &self.model_budgets {
            let (device, size) = spec
                .split_once('=')
                .ok_or_else(|| format!("--model-budget `{spec}` is not DEVICE=SIZE"))?;
            let bytes = memcoord::units::parse_size(size)
                .map_err(|e| format!("--model-budget {device}: {e}"))?;
            service = service.with_model_budget(device.trim(), bytes);
        }
        if let Some(dir) = &self.state_dir {
            let (with_state, adopted) = service
                .with_state_dir(dir)
                .map_err(|e| format!("--state-dir: {e}"))?;
            service = with_state;
            // For crash tests: `MEMCOORD_TEST_FAILPOINT=state-written:N` kills the worker
            // (SIGKILL) right after its Nth state file write from now on, before the memory
            // that file no longer lists is given back.
            if let Some(n) = std::env::var("MEMCOORD_TEST_FAILPOINT")
                .ok()
                .and_then(|v| v.strip_prefix("state-written:")?.parse::<u64>().ok())
            {
                let writes = std::sync::atomic::AtomicU64::new(0);
                service = service.on_state_written(Box::new(move || {
                    if writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == n {
                        memcoord::backends::kill_this_process();
                    }
                }));
            }
            if adopted > 0 {
                tracing::info!(
                    "adopted {adopted} persistent shm allocations from {}",
                    dir.display()
                );
            }
        }
        let service = Arc::new(service);
        service.start_keep_alive_sweeper();
        service.start_sampler();
        let threads = Threads::new();
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            show_transfer_progress(&threads, Arc::clone(&service));
        }
        Ok((settings, service, threads))
    }
}

/// A timeout option: seconds, more than 0 and at most an hour.
fn timeout_option(name: &str, seconds: f64) -> Result<std::time::Duration, String> {
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
        return Err(format!(
            "{name} must be a number of seconds above 0 and at most 3600, got {seconds}"
        ));
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

/// Triggers `shutdown` on SIGTERM or SIGINT, after `on_signal` (for people). The handlers are
/// installed now, before anything is served, so a signal is never met by the default action.
fn watch_signals(
    runtime: &tokio::runtime::Runtime,
    shutdown: &Shutdown,
    on_signal: fn(),
) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = runtime
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })
        .map_err(|e| format!("cannot watch signals: {e}"))?;
    let shutdown = shutdown.clone();
    runtime.spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        on_signal();
        shutdown.trigger();
    });
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("memcoord-rt")
        .enable_time()
        .enable_io()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// Thresholds of `memory.optimization_recs`.
#[derive(Args)]
struct AdviceArgs {
    /// An unleased model unused this long counts as idle (OffloadIdleModels, UnloadIdleModels).
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    idle_model_seconds: f64,
    /// A persistent allocation untouched this long is worth a review (ReviewPersistent).
    #[arg(long, value_name = "SECONDS", default_value_t = 3600.0)]
    review_persistent_seconds: f64,
    /// Fragmentation (%) from which a defragment is advised.
    #[arg(long, value_name = "PERCENT", default_value_t = 20.0)]
    defragment_above_percentage: f64,
}

impl AdviceArgs {
    fn rules(&self) -> Result<memcoord::managers::advisor::Rules, String> {
        for (name, v) in [
            ("--idle-model-seconds", self.idle_model_seconds),
            (
                "--review-persistent-seconds",
                self.review_persistent_seconds,
            ),
            (
                "--defragment-above-percentage",
                self.defragment_above_percentage,
            ),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name} must be a number ≥ 0, got {v}"));
            }
        }
        if self.defragment_above_percentage > 100.0 {
            return Err(format!(
                "--defragment-above-percentage is a percentage (0 to 100), got {}",
                self.defragment_above_percentage
            ));
        }
        Ok(memcoord::managers::advisor::Rules {
            idle_model_seconds: self.idle_model_seconds,
            review_persistent_seconds: self.review_persistent_seconds.min(1e9),
            fragmentation_percentage: self.defragment_above_percentage,
            ..Default::default()
        })
    }
}

#[derive(Args)]
struct DeviceArgs {
    /// A device's budget, e.g. `cpu=8GiB`, `cuda:0=40GiB` (repeatable). Default: half of `cpu`
    /// and `shm`, 90% of a GPU.
    #[arg(long = "budget", value_name = "DEVICE=SIZE")]
    budgets: Vec<String>,
    /// A TOML config file (`[budgets]` table, `max_line_bytes`, `shm_dir`).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve host memory only: do not look for GPUs.
    #[arg(long)]
    no_gpu: bool,
    /// Page-locked host memory for `cpu` allocations of type Staging beside a GPU (transfers
    /// from and to it need no staging copy). Default 2GiB, at most a quarter of the cpu budget.
    #[arg(long, value_name = "SIZE")]
    pinned_pool: Option<String>,
    /// Permissions of the `shm` file, in octal. Default 0600: only this user's processes can
    /// map allocations by their handle's path (anyone who can open the file reads every `shm`
    /// allocation: model weights, client data); 0640 lets the file's group read them, 0660 write
    /// them too. At most 0664: world-writable modes and execute bits are refused. Exports need
    /// none of this: a claim passes the file's descriptor.
    #[arg(long, value_name = "MODE")]
    shm_mode: Option<String>,
}

impl DeviceArgs {
    fn settings(&self) -> Result<Settings, ConfigError> {
        let mut s = match &self.config {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        for b in &self.budgets {
            s.set_budget(b)?;
        }
        s.no_gpu |= self.no_gpu;
        if let Some(mode) = &self.shm_mode {
            s.set_shm_mode(mode)?;
        }
        if let Some(size) = &self.pinned_pool {
            s.pinned_pool = Some(
                memcoord::units::parse_size(size)
                    .map_err(|e| ConfigError::Budget(format!("--pinned-pool: {e}")))?,
            );
        }
        Ok(s)
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Worker {
            service,
            max_line_bytes,
            metrics_addr,
            token_file,
            unix,
        } => {
            let token = token_file
                .as_deref()
                .map(memcoord::transport::http::read_token_file)
                .transpose()?;
            // Refused before anything starts, as serve refuses it: off loopback, a token is
            // required.
            if let Some(addr) = &metrics_addr {
                memcoord::transport::http::check_listen_text(addr, token.is_some())
                    .map_err(|m| format!("--metrics-addr: {m}"))?;
            }
            let (max_in_flight, spin_us) = (service.max_in_flight, service.spin_us);
            let (settings, service, _threads) = service.start(token.as_deref())?;
            let options = WorkerOptions {
                max_line_bytes: max_line_bytes.unwrap_or(settings.max_line_bytes),
                max_in_flight,
                spin: std::time::Duration::from_micros(spin_us),
            };
            let runtime = runtime()?;
            let shutdown = Shutdown::new();
            watch_signals(&runtime, &shutdown, || {
                tracing::info!("signal received: finishing in-flight requests");
            })?;
            if let Some(addr) = &metrics_addr {
                let bound = memcoord::transport::server::start_metrics_server(
                    addr,
                    Arc::clone(&service),
                    token,
                    memcoord::transport::server::Timeouts::default(),
                    &runtime,
                    shutdown.wait(),
                )
                .map_err(|e| format!("--metrics-addr {addr}: {e}"))?;
                eprintln!("memcoord: metrics on http://{bound}/metrics");
            }
            let dispatcher = Dispatcher::new(service);
            let unix = unix.bind(&dispatcher, &runtime, &options)?;
            stdio::run(dispatcher, &runtime, &options, &shutdown, unix)
                .map_err(|e| format!("worker failed: {e}"))?;
            runtime.shutdown_background();
            Ok(())
        }
        Command::Serve {
            service,
            listen,
            unix,
            token_file,
            max_body_bytes,
            header_timeout_seconds,
            body_timeout_seconds,
        } => {
            let token = token_file
                .as_deref()
                .map(memcoord::transport::http::read_token_file)
                .transpose()?;
            let listen = match (listen, &unix.unix) {
                (Some(l), _) => Some(l),
                (None, Some(_)) => None,
                (None, None) => Some(memcoord::transport::http::DEFAULT_LISTEN.to_string()),
            };
            // Refused before anything starts: off loopback, a token is required.
            if let Some(listen) = &listen {
                memcoord::transport::http::check_listen_text(listen, token.is_some())
                    .map_err(|m| format!("serve: {m}"))?;
            }
            let timeouts = memcoord::transport::server::Timeouts {
                header: timeout_option("--header-timeout-seconds", header_timeout_seconds)?,
                body: timeout_option("--body-timeout-seconds", body_timeout_seconds)?,
            };
            let (max_in_flight, spin_us) = (service.max_in_flight, service.spin_us);
            let (settings, service, _threads) = service.start(token.as_deref())?;
            let runtime = runtime()?;
            let shutdown = Shutdown::new();
            watch_signals(&runtime, &shutdown, || eprintln!("memcoord: stopping"))?;
            let options = memcoord::transport::server::ServeOptions {
                token,
                body_limit: max_body_bytes.unwrap_or(settings.max_line_bytes),
                max_in_flight,
                timeouts,
            };
            let lines = WorkerOptions {
                max_line_bytes: settings.max_line_bytes,
                max_in_flight,
                spin: std::time::Duration::from_micros(spin_us),
            };
            let sockets = unix.bind(&Dispatcher::new(Arc::clone(&service)), &runtime, &lines)?;
            let Some(listen) = listen else {
                memcoord::transport::unix::serve_alone(
                    runtime.handle(),
                    &service,
                    sockets,
                    &shutdown,
                );
                runtime.shutdown_background();
                return Ok(());
            };
            // The socket's sessions end (what they hold released) before the service stops.
            let (stopping, stop) = (Arc::clone(&service), shutdown.clone());
            let stopped = async move {
                stop.wait().await;
                stopping.begin_shutdown();
                if let Some(s) = sockets {
                    let _ = tokio::task::spawn_blocking(move || s.stop()).await;
                }
            };
            let result = runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(&listen).await?;
                let local = listener.local_addr()?;
                memcoord::transport::http::check_listen_address(&local, options.token.is_some())
                    .map_err(|m| std::io::Error::new(std::io::ErrorKind::PermissionDenied, m))?;
                eprintln!(
                    "memcoord: serving on http://{local}/ (dashboard at /, API under /v1, /metrics){}",
                    if options.token.is_some() {
                        "; bearer token required"
                    } else {
                        ""
                    }
                );
                memcoord::transport::server::serve(listener, service, options, stopped).await
            });
            runtime.shutdown_background();
            result.map_err(|e| format!("serve: {e}"))
        }
        Command::Replay {
            trace,
            device,
            scale,
            defragment_every,
            json,
            devices,
        } => {
            if !(scale.is_finite() && scale > 0.0) {
                return Err(format!("--scale must be a positive number, got {scale}"));
            }
            let file = std::fs::File::open(&trace)
                .map_err(|e| format!("cannot open {}: {e}", trace.display()))?;
            let ops = memcoord::protocol::trace::parse_trace(std::io::BufReader::new(file))
                .map_err(|e| format!("{}: {e}", trace.display()))?;
            let settings = devices.settings().map_err(|e| e.to_string())?;
            let mut engine = AllocationEngine::new(settings.devices().map_err(|e| e.to_string())?);
            let d = engine.device_index(&device).map_err(|e| e.to_string())?;
            let r = replay::replay(&mut engine, d, &ops, scale, defragment_every);
            engine.close();
            if json {
                println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
            } else {
                println!("trace                      {}", trace.display());
                println!("device                     {device} (scale {scale})");
                println!("ops                        {}", r.ops);
                println!("ops per second             {:.0}", r.ops_per_second);
                println!(
                    "peak allocated             {} ({} bytes)",
                    format_bytes(r.peak_allocated_bytes),
                    r.peak_allocated_bytes
                );
                println!(
                    "peak reserved              {} ({} bytes)",
                    format_bytes(r.peak_reserved_bytes),
                    r.peak_reserved_bytes
                );
                println!(
                    "reserved / allocated       {:.4}",
                    r.reserved_over_allocated
                );
                println!(
                    "fragmentation at peak      {:.2}%",
                    r.fragmentation_percentage_at_peak
                );
                if r.defragmentations > 0 {
                    println!("defragmentations           {}", r.defragmentations);
                }
                if r.failed_allocations > 0 {
                    println!(
                        "failed allocations         {} (raise the budget)",
                        r.failed_allocations
                    );
                }
            }
            Ok(())
        }
        Command::Status { target } => target.show_devices(cli::status),
        Command::Devices { target } => target.show_devices(cli::devices),
        Command::Allocs {
            target,
            device,
            limit,
        } => target.show(|src| cli::allocs(src, device.as_deref(), limit)),
        Command::Models { target } => target.show(cli::models),
        Command::Pressure { target } => target.show(cli::pressure),
        Command::Sessions { target } => target.show(cli::sessions),
        Command::Top {
            target,
            interval,
            iterations,
        } => {
            if target.json {
                return Err("top draws tables; for JSON use status --json (repeatedly)".into());
            }
            if !(interval.is_finite() && interval > 0.0) {
                return Err(format!(
                    "--interval must be a positive number, got {interval}"
                ));
            }
            let src = target.source()?;
            let r = cli::top(
                &src,
                std::time::Duration::from_secs_f64(interval),
                iterations,
            );
            src.close();
            r
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "memcoord",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

/// Transfers bigger than this get a progress bar on stderr (when it is a terminal).
const PROGRESS_BAR_BYTES: u64 = 256 << 20;

/// Draws a progress bar on stderr for each long transfer while it runs.
fn show_transfer_progress(threads: &Threads, service: Arc<MemoryService>) {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    use std::collections::HashMap;
    threads.spawn("memcoord-progress", move |stop| {
        let bars = MultiProgress::new();
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        let mut shown: HashMap<String, ProgressBar> = HashMap::new();
        while !stop.sleep(std::time::Duration::from_millis(200)) {
            let running = service.running_transfers();
            for t in &running {
                if t.total_bytes < PROGRESS_BAR_BYTES {
                    continue;
                }
                let bar = shown.entry(t.transfer_id.clone()).or_insert_with(|| {
                    let b = bars.add(ProgressBar::new(t.total_bytes));
                    b.set_style(style.clone());
                    b.set_message(format!(
                        "{} {} -> {}",
                        t.mode, t.source_device_id, t.destination_device_id
                    ));
                    b
                });
                bar.set_position(t.bytes_transferred);
            }
            shown.retain(|id, bar| {
                let still = running.iter().any(|t| &t.transfer_id == id);
                if !still {
                    bar.finish_and_clear();
                }
                still
            });
        }
    });
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MEMCOORD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("memcoord: {message}");
            ExitCode::from(2)
        }
    }
}
