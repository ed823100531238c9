//! An in-process worker: the stdio transport (`transport::stdio::serve`) over a pipe pair, on a
//! service this test holds, so a test can look at the service's books directly and needs no
//! process. Spawn the binary only for what only a process shows (signals, exit codes, crashes).

use memcoord::config::Settings;
use memcoord::dispatch::Dispatcher;
use memcoord::service::MemoryService;
use memcoord::transport::stdio::{self, WorkerOptions};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

pub struct InProcessWorker {
    pub service: Arc<MemoryService>,
    input: Option<std::io::PipeWriter>,
    answers: Receiver<Value>,
    served: Option<std::thread::JoinHandle<()>>,
    _runtime: tokio::runtime::Runtime,
    next_id: u64,
}

impl InProcessWorker {
    /// A worker over `cpu` and `shm` with the given budgets (no GPU).
    pub fn start(cpu: &str, shm: &str) -> InProcessWorker {
        let mut settings = Settings {
            no_gpu: true,
            ..Default::default()
        };
        settings.set_budget(&format!("cpu={cpu}")).unwrap();
        settings.set_budget(&format!("shm={shm}")).unwrap();
        let service = Arc::new(MemoryService::new(settings.devices().unwrap()));
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
            stdio::serve(
                dispatcher,
                handle,
                request_reader,
                answer_writer,
                &WorkerOptions::default(),
            );
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
            served: Some(served),
            _runtime: runtime,
            next_id: 0,
        }
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

    /// The next answer to arrive.
    pub fn next_answer(&self) -> Value {
        self.answers
            .recv_timeout(Duration::from_secs(30))
            .expect("an answer within 30 s")
    }

    /// Closes the input (EOF) and waits until the transport has answered everything and
    /// released what it held, as `memcoord worker` does before it exits.
    pub fn close(&mut self) -> Vec<Value> {
        self.input.take();
        if let Some(served) = self.served.take() {
            served.join().unwrap();
        }
        self.answers.try_iter().collect()
    }
}
