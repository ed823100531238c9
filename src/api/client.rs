//! A typed client: send a typed request, get its typed answer or the contract's error, from a
//! service in this process, a worker's stdio, or a `memcoord serve` at a URL. The CLI and tests
//! use it instead of indexing JSON.
//!
//! [`Client::ask`] names the action by its type (`client.ask::<GetUsage>(request)` gives a
//! `MemoryUsageStats`); [`Client::call`] takes and gives the [`Request`] and [`Response`] enums.

use super::{Action, ActionSpec, Reply, Request, Response};
use crate::dispatch::Dispatcher;
use crate::protocol::{ErrorCode, ProtocolError};
use crate::service::MemoryService;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a call got no answer's `data`.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientError {
    /// The coordinator answered with an error of the contract.
    Refused(ProtocolError),
    /// No answer: the connection failed, or what came back was not an answer.
    Failed(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Refused(e) => write!(f, "{}: {}", e.code.as_str(), e.message),
            ClientError::Failed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ClientError {}

/// A worker's stdin and stdout, and the next request id.
struct Lines {
    input: Box<dyn Write + Send>,
    output: BufReader<Box<dyn Read + Send>>,
    next_id: u64,
}

enum Link {
    Local(Dispatcher),
    Stdio(Mutex<Lines>),
    Http {
        url: String,
        token: Option<String>,
        agent: ureq::Agent,
    },
}

/// Where answers come from (see the module's doc).
pub struct Client {
    link: Link,
}

/// A response envelope, its `data` left unread.
#[derive(Deserialize)]
struct Envelope<'a> {
    request_id: Option<String>,
    success: bool,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    error_code: Option<String>,
    error_message: Option<String>,
}

impl Client {
    /// A client of a service in this process. Requests that would wait (an allocate waiting
    /// for room, a model load) are refused: ask a running server for those.
    pub fn local(service: Arc<MemoryService>) -> Client {
        Client {
            link: Link::Local(Dispatcher::new(service)),
        }
    }

    /// A client of a `memcoord serve` at `url` (`http://host:port`), with its bearer token.
    pub fn http(url: &str, token: Option<String>) -> Client {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Client {
            link: Link::Http {
                url: url.trim_end_matches('/').to_string(),
                token,
                agent,
            },
        }
    }

    /// A client of a worker over its stdio: requests are written to `input` (its stdin),
    /// answers read from `output` (its stdout). Calls are one at a time.
    pub fn stdio(input: impl Write + Send + 'static, output: impl Read + Send + 'static) -> Client {
        Client {
            link: Link::Stdio(Mutex::new(Lines {
                input: Box::new(input),
                output: BufReader::new(Box::new(output)),
                next_id: 0,
            })),
        }
    }

    /// The service of a local client.
    pub fn service(&self) -> Option<&Arc<MemoryService>> {
        match &self.link {
            Link::Local(d) => Some(d.service()),
            _ => None,
        }
    }

    /// Carries out `request`: its typed answer, or why not.
    pub fn call(&self, request: &Request) -> Result<Response, ClientError> {
        let action = request.action();
        let data = request
            .data()
            .map_err(|e| ClientError::Failed(e.to_string()))?;
        let answer = self.exchange(action, &data)?;
        Response::parse(action, &answer)
            .map_err(|e| ClientError::Failed(format!("{}: unexpected answer ({e})", action.name())))
    }

    /// Carries out the action `A`: its typed answer, or why not.
    pub fn ask<A: ActionSpec>(&self, request: &A::Request) -> Result<A::Response, ClientError> {
        let action = Action::from_name(A::NAME)
            .ok_or_else(|| ClientError::Failed(format!("{} is not in the list", A::NAME)))?;
        let data =
            serde_json::to_string(request).map_err(|e| ClientError::Failed(e.to_string()))?;
        let answer = self.exchange(action, &data)?;
        serde_json::from_str(&answer)
            .map_err(|e| ClientError::Failed(format!("{}: unexpected answer ({e})", A::NAME)))
    }

    /// Sends `action` with `data` (JSON); the answer's `data` (JSON).
    fn exchange(&self, action: Action, data: &str) -> Result<String, ClientError> {
        match &self.link {
            Link::Local(d) => {
                let raw = RawValue::from_string(data.to_string())
                    .map_err(|e| ClientError::Failed(e.to_string()))?;
                let data = (raw.get() != "null").then_some(&*raw);
                match d.call_action(action, data, None) {
                    Reply::Now(Ok(answer)) => serde_json::to_string(&answer)
                        .map_err(|e| ClientError::Failed(e.to_string())),
                    Reply::Now(Err(e)) => Err(ClientError::Refused(e)),
                    Reply::Later(_) => Err(ClientError::Failed(format!(
                        "{} would wait; ask a running server (--url)",
                        action.name()
                    ))),
                }
            }
            Link::Stdio(lines) => {
                let mut lines = lines
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                lines.next_id += 1;
                let id = format!("client-{}", lines.next_id);
                let line = format!(
                    "{{\"request_id\":\"{id}\",\"action\":\"{}\",\"data\":{data}}}\n",
                    action.name()
                );
                let failed = |e: std::io::Error| ClientError::Failed(format!("the worker: {e}"));
                lines.input.write_all(line.as_bytes()).map_err(failed)?;
                lines.input.flush().map_err(failed)?;
                loop {
                    let mut text = String::new();
                    if lines.output.read_line(&mut text).map_err(failed)? == 0 {
                        return Err(ClientError::Failed(
                            "the worker closed its output before answering".into(),
                        ));
                    }
                    let envelope = read_envelope(&text)?;
                    if envelope.request_id.as_deref() == Some(id.as_str()) {
                        return answer_of(envelope);
                    }
                }
            }
            Link::Http { url, token, agent } => {
                let line = format!(
                    "{{\"request_id\":\"cli\",\"action\":\"{}\",\"data\":{data}}}",
                    action.name()
                );
                let mut req = agent
                    .post(format!("{url}/v1/command"))
                    .header("content-type", "application/json");
                if let Some(t) = token {
                    req = req.header("authorization", format!("Bearer {t}"));
                }
                let mut resp = req
                    .send(line.as_str())
                    .map_err(|e| ClientError::Failed(format!("{url}: {e}")))?;
                let text = resp
                    .body_mut()
                    .read_to_string()
                    .map_err(|e| ClientError::Failed(format!("{url}: {e}")))?;
                let envelope = serde_json::from_str::<Envelope<'_>>(&text).map_err(|e| {
                    ClientError::Failed(format!("{url}: not a memcoord answer ({e}): {text}"))
                })?;
                answer_of(envelope)
            }
        }
    }
}

fn read_envelope(text: &str) -> Result<Envelope<'_>, ClientError> {
    serde_json::from_str(text)
        .map_err(|e| ClientError::Failed(format!("not a memcoord answer ({e}): {}", text.trim())))
}

/// The envelope's `data`, or its error.
fn answer_of(envelope: Envelope<'_>) -> Result<String, ClientError> {
    if envelope.success {
        return Ok(envelope.data.map_or("null", RawValue::get).to_string());
    }
    let code = envelope.error_code.unwrap_or_default();
    let message = envelope.error_message.unwrap_or_default();
    match ErrorCode::ALL.iter().find(|c| c.as_str() == code) {
        Some(c) => Err(ClientError::Refused(ProtocolError::new(*c, message))),
        None => Err(ClientError::Failed(format!(
            "{}: {message}",
            if code.is_empty() { "ERROR" } else { &code }
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::actions::get_usage::GetUsage;
    use crate::api::actions::list_devices::ListDevices;
    use crate::api::{AllocateRequest, DeviceRequest};

    fn service() -> Arc<MemoryService> {
        let mut settings = crate::config::Settings {
            no_gpu: true,
            ..Default::default()
        };
        settings.set_budget("cpu=64MiB").unwrap();
        settings.set_budget("shm=64MiB").unwrap();
        Arc::new(MemoryService::new(settings.devices().unwrap()))
    }

    #[test]
    fn a_local_client_gets_typed_answers_and_errors() {
        let client = Client::local(service());
        let devices = client.ask::<ListDevices>(&()).unwrap();
        assert!(devices.devices.iter().any(|d| d.device_id == "cpu"));
        let Response::Allocate(a) = client
            .call(&Request::Allocate(AllocateRequest::new("cpu", 4096)))
            .unwrap()
        else {
            panic!("not an allocate answer");
        };
        assert_eq!(a.allocation.size_bytes, 4096);
        let usage = client
            .ask::<GetUsage>(&DeviceRequest {
                device_id: "cpu".into(),
            })
            .unwrap();
        assert!(usage.allocated_bytes >= 4096);
        let e = client
            .ask::<GetUsage>(&DeviceRequest {
                device_id: "nope".into(),
            })
            .unwrap_err();
        assert!(
            matches!(e, ClientError::Refused(ref p) if p.code == ErrorCode::InvalidDevice),
            "{e}"
        );
        if let Some(s) = client.service() {
            s.close();
        }
    }

    #[test]
    fn a_stdio_client_talks_to_a_worker_over_its_pipes() {
        use crate::transport::stdio::{self, WorkerOptions};
        let service = service();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
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
        let client = Client::stdio(request_writer, answer_reader);
        let Response::Allocate(a) = client
            .call(&Request::Allocate(AllocateRequest::new("shm", 8192)))
            .unwrap()
        else {
            panic!("not an allocate answer");
        };
        assert_eq!(a.device_id, "shm");
        let usage = client
            .ask::<GetUsage>(&DeviceRequest {
                device_id: "shm".into(),
            })
            .unwrap();
        assert_eq!(usage.allocation_count, 1);
        let e = client
            .call(&Request::Deallocate(crate::api::DeallocateRequest {
                allocation_id: "nope".into(),
                device_id: None,
            }))
            .unwrap_err();
        assert!(matches!(e, ClientError::Refused(_)), "{e}");
        drop(client); // EOF: the worker answers everything, releases and returns.
        served.join().unwrap();
    }
}
