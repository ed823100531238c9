//! An in-process worker: the stdio transport (`transport::stdio::serve`) over a pipe pair, on a
//! service this test holds, so a test can look at the service's books directly and needs no
//! process. On a [`ManualClock`] the test moves time instead of sleeping. Spawn the binary only
//! for what only a process shows (signals, exit codes, crashes).
//!
//! [`InProcessServer`] is the same for HTTP: the router served on a port-0 listener until its
//! shutdown future completes.

use super::{HttpAnswer, Requests, check_envelope, http_request};
use memcoord::config::Settings;
use memcoord::dispatch::Dispatcher;
use memcoord::managers::clock::ManualClock;
use memcoord::runtime::Shutdown;
use memcoord::service::MemoryService;
use memcoord::transport::server::{self, ServeOptions};
use memcoord::transport::stdio::{self, WorkerOptions};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

pub struct InProcessWorker {
    pub service: Arc<MemoryService>,
    input: Option<std::io::PipeWriter>,
    answers: Receiver<Value>,
    /// Answers received but not yet asked for, by request id.
    stash: HashMap<String, Vec<Value>>,
    served: Option<std::thread::JoinHandle<()>>,
    runtime: tokio::runtime::Runtime,
    /// Stops what serves beside the transport (a metrics endpoint).
    shutdown: Shutdown,
    next_id: u64,
}

/// Settings with `cpu` and `shm` budgets (no GPU).
pub fn settings(cpu: &str, shm: &str) -> Settings {
    let mut settings = Settings {
        no_gpu: true,
        ..Default::default()
    };
    settings.set_budget(&format!("cpu={cpu}")).unwrap();
    settings.set_budget(&format!("shm={shm}")).unwrap();
    settings
}

impl InProcessWorker {
    /// A worker over `cpu` and `shm` with the given budgets (no GPU).
    pub fn start(cpu: &str, shm: &str) -> InProcessWorker {
        InProcessWorker::over(MemoryService::new(settings(cpu, shm).devices().unwrap()))
    }

    /// A worker with small budgets (cpu 64 MiB, shm 64 MiB), as `Worker::small` spawns.
    pub fn small() -> InProcessWorker {
        InProcessWorker::start("64MiB", "64MiB")
    }

    /// A worker over `cpu` and `shm` on the machine's clock; `configure` sets the service up.
    pub fn on_clock_of_the_machine(
        cpu: &str,
        shm: &str,
        configure: impl FnOnce(MemoryService) -> MemoryService,
    ) -> InProcessWorker {
        InProcessWorker::over(configure(MemoryService::new(
            settings(cpu, shm).devices().unwrap(),
        )))
    }

    /// A worker over `cpu` and `shm` whose time is a [`ManualClock`] the test moves;
    /// `configure` sets the service up (model root, advice rules, …). No sampler runs: call
    /// `service.sample()` where the sampler's second would tick.
    pub fn on_manual_clock(
        cpu: &str,
        shm: &str,
        configure: impl FnOnce(MemoryService) -> MemoryService,
    ) -> (InProcessWorker, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let service =
            MemoryService::with_clock(settings(cpu, shm).devices().unwrap(), clock.clone());
        (InProcessWorker::over(configure(service)), clock)
    }

    /// A worker over `service`.
    pub fn over(service: MemoryService) -> InProcessWorker {
        InProcessWorker::over_with(service, WorkerOptions::default())
    }

    /// A worker over `service` with `options` (`--max-line-bytes`, `--max-in-flight`).
    pub fn over_with(service: MemoryService, options: WorkerOptions) -> InProcessWorker {
        let service = Arc::new(service);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (request_reader, request_writer) = std::io::pipe().unwrap();
        let (answer_reader, answer_writer) = std::io::pipe().unwrap();
        let dispatcher = Dispatcher::new(Arc::clone(&service));
        let handle = runtime.handle().clone();
        let served = std::thread::spawn(move || {
            stdio::serve(dispatcher, handle, request_reader, answer_writer, &options);
        });
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(answer_reader).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line).unwrap();
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        InProcessWorker {
            service,
            input: Some(request_writer),
            answers,
            stash: HashMap::new(),
            served: Some(served),
            runtime,
            shutdown: Shutdown::new(),
            next_id: 0,
        }
    }

    /// Serves the metrics endpoint beside it (as `--metrics-addr` does) on a port-0 loopback
    /// listener, until the worker is closed; returns the port.
    pub fn serve_metrics(&self) -> u16 {
        server::start_metrics_server(
            "127.0.0.1:0",
            Arc::clone(&self.service),
            None,
            server::Timeouts::default(),
            &self.runtime,
            self.shutdown.wait(),
        )
        .unwrap()
        .port()
    }

    /// Writes raw bytes to the worker's input.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let input = self.input.as_mut().expect("input open");
        input.write_all(bytes).unwrap();
        input.flush().unwrap();
    }

    /// Sends a request without waiting; returns its id.
    pub fn submit(&mut self, action: &str, data: Value) -> String {
        self.next_id += 1;
        let id = format!("inproc-{}", self.next_id);
        let line = json!({"request_id": id, "action": action, "data": data});
        let input = self.input.as_mut().expect("input open");
        writeln!(input, "{line}").unwrap();
        input.flush().unwrap();
        id
    }

    /// The next answer to arrive (one received and not yet asked for first).
    pub fn next_answer(&mut self) -> Value {
        if let Some(v) = self.stash.values_mut().find_map(std::vec::Vec::pop) {
            return v;
        }
        self.answers
            .recv_timeout(Duration::from_secs(30))
            .expect("an answer within 30 s")
    }

    /// Waits for the answer to `id` (`""` = an answer with a null id).
    pub fn wait_for(&mut self, id: &str, timeout: Duration) -> Value {
        if let Some(v) = self
            .stash
            .get_mut(id)
            .and_then(|q| (!q.is_empty()).then(|| q.remove(0)))
        {
            return v;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .answers
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no answer to {id} within {timeout:?}"));
            check_envelope(&v);
            let rid = v["request_id"].as_str().unwrap_or("").to_string();
            if rid == id {
                return v;
            }
            self.stash.entry(rid).or_default().push(v);
        }
    }

    /// Whether an answer to `id` arrived within `timeout` (it stays to be asked for).
    pub fn answered_within(&mut self, id: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stash.get(id).is_some_and(|q| !q.is_empty()) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.answers.recv_timeout(left) {
                Ok(v) => {
                    check_envelope(&v);
                    let rid = v["request_id"].as_str().unwrap_or("").to_string();
                    self.stash.entry(rid).or_default().push(v);
                }
                Err(_) => return false,
            }
        }
    }

    /// Waits until `n` requests wait for memory on `device` (read from the service's books).
    pub fn until_waiting(&self, device: &str, n: u64) {
        let req = memcoord::api::OptionalDeviceRequest {
            device_id: Some(device.to_string()),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.service.get_pressure(&req).unwrap().devices[0].waiting_requests != n {
            assert!(
                Instant::now() < deadline,
                "{n} requests never waited on {device}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Closes the input (EOF) and waits until the transport has answered everything and
    /// released what it held, as `memcoord worker` does before it exits.
    pub fn close(&mut self) -> Vec<Value> {
        self.input.take();
        if let Some(served) = self.served.take() {
            served.join().unwrap();
        }
        self.shutdown.trigger();
        let mut rest: Vec<Value> = self.stash.drain().flat_map(|(_, q)| q).collect();
        rest.extend(self.answers.try_iter());
        rest
    }
}

impl Requests for InProcessWorker {
    fn request(&mut self, action: &str, data: Value) -> Value {
        let id = self.submit(action, data);
        let v = self.wait_for(&id, Duration::from_secs(20));
        assert_eq!(v["request_id"], json!(id));
        v
    }
}

impl Drop for InProcessWorker {
    /// Ends as `memcoord worker` does at EOF: everything answered, the service shut down
    /// (before the runtime it answers on goes away).
    fn drop(&mut self) {
        self.input.take();
        if let Some(served) = self.served.take() {
            let _ = served.join();
        }
        self.shutdown.trigger();
    }
}

/// An in-process HTTP server: `transport::server::serve` on a port-0 loopback listener, over a
/// service this test holds, stopped through its [`Shutdown`] as `memcoord serve` is by a signal.
pub struct InProcessServer {
    pub service: Arc<MemoryService>,
    pub port: u16,
    shutdown: Shutdown,
    served: Option<std::thread::JoinHandle<()>>,
}

impl InProcessServer {
    /// A server over `cpu` and `shm` with the given budgets, the service set up by
    /// `configure`, serving as `options` say.
    pub fn start(
        cpu: &str,
        shm: &str,
        configure: impl FnOnce(MemoryService) -> MemoryService,
        options: ServeOptions,
    ) -> InProcessServer {
        let service = configure(MemoryService::new(settings(cpu, shm).devices().unwrap()));
        InProcessServer::over(service, options)
    }

    /// A server over `service`.
    pub fn over(service: MemoryService, options: ServeOptions) -> InProcessServer {
        let service = Arc::new(service);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shutdown = Shutdown::new();
        let (served_service, stop) = (Arc::clone(&service), shutdown.wait());
        let served = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                server::serve(listener, served_service, options, stop)
                    .await
                    .unwrap();
            });
        });
        InProcessServer {
            service,
            port,
            shutdown,
            served: Some(served),
        }
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> HttpAnswer {
        http_request(self.port, method, path, headers, body)
    }

    pub fn get(&self, path: &str) -> HttpAnswer {
        self.request("GET", path, &[], None)
    }

    pub fn post(&self, path: &str, body: &Value) -> HttpAnswer {
        self.request("POST", path, &[], Some(&body.to_string()))
    }

    /// Stops it as a signal stops `memcoord serve`, and waits until it has shut the service
    /// down.
    pub fn stop(&mut self) {
        self.shutdown.trigger();
        if let Some(served) = self.served.take() {
            served.join().unwrap();
        }
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(served) = self.served.take() {
            let _ = served.join();
        }
    }
}
