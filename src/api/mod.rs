//! The contract's actions, one file each under [`actions`]: its request (the wire form and its
//! parsing into the checked request, a type of [`crate::service::requests`], the service's
//! input), its response, its REST route, its scheduling (answered at once, on a blocking
//! thread, or its own async path) and its handler calling the service.
//!
//! The list at the end of this file is the only place that names them all: from it come the
//! [`Action`] enum and [`Action::from_name`], the typed [`Request`] and [`Response`] enums, the
//! REST route table ([`REST_ROUTES`]), the OpenAPI paths and the stdio JSON Schema
//! (`transport::openapi`), and the typing of query-string fields ([`query`]). Adding an action
//! is one new file under `actions/` and one line in that list.
//!
//! No envelope here: `request_id`, JSON lines and HTTP bodies are the transports' business.

pub mod client;
pub mod context;
pub mod defaults;
pub mod parse;
pub mod query;

pub use context::{
    Admit, Answer, Context, InFlightLimit, InFlightTicket, Reply, catching_panics, internal_error,
};
pub use defaults::TransportDefaults;

use crate::protocol::ProtocolError;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::DeserializeOwned;
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

/// An action's REST route: method, path (axum syntax, `{name}` for a parameter, named as the
/// field of `data` it fills) and what it does, for people.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// GET, POST or DELETE.
    pub method: &'static str,
    /// The path.
    pub path: &'static str,
    /// What it does (docs, OpenAPI).
    pub summary: &'static str,
}

impl Route {
    /// A GET route.
    pub const fn get(path: &'static str, summary: &'static str) -> Route {
        Route {
            method: "GET",
            path,
            summary,
        }
    }

    /// A POST route.
    pub const fn post(path: &'static str, summary: &'static str) -> Route {
        Route {
            method: "POST",
            path,
            summary,
        }
    }

    /// A DELETE route.
    pub const fn delete(path: &'static str, summary: &'static str) -> Route {
        Route {
            method: "DELETE",
            path,
            summary,
        }
    }
}

/// One REST route with the action it carries out: what `transport::http` serves and
/// `transport::openapi` documents.
#[derive(Debug, Clone, Copy)]
pub struct RestRoute {
    /// GET, POST or DELETE.
    pub method: &'static str,
    /// The path, `{name}` for a parameter (the field it fills).
    pub path: &'static str,
    /// The protocol action.
    pub action: &'static str,
    /// What it does, for people (docs, OpenAPI).
    pub summary: &'static str,
}

/// What one action's file says about it.
pub trait ActionSpec {
    /// Its name on the wire (`memory.…`).
    const NAME: &'static str;
    /// Its REST route.
    const ROUTE: Route;
    /// The checked request: the service's input (`service::requests`), written back as `data`
    /// by [`client`].
    type Request: Serialize + Send + 'static;
    /// The answer's `data`.
    type Response: Serialize + DeserializeOwned + JsonSchema + Send + 'static;

    /// The JSON Schema of its `data` (None: it takes none).
    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema>;

    /// Parses and checks `data` (None: absent or `null`).
    fn parse(data: Option<&RawValue>) -> Result<Self::Request, ProtocolError>;

    /// Carries it out: at once, or later (see [`Reply`]).
    fn handle(cx: &Context<'_>, request: Self::Request) -> Reply<Self::Response>;
}

/// Generates everything that lists the actions from one list: `Variant in module`, the file
/// `actions/module.rs` holding `pub struct Variant` and its [`ActionSpec`].
macro_rules! actions {
    ($($variant:ident in $module:ident),+ $(,)?) => {
        /// One file per action of the contract.
        pub mod actions {
            $(pub mod $module;)+
        }

        /// Every action of the contract.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Action {
            $(
                #[doc = concat!("See [`actions::", stringify!($module), "`].")]
                $variant,
            )+
        }

        impl Action {
            /// Every action, in the order of the list (the REST table's and the docs').
            pub const ALL: &'static [Action] = &[$(Action::$variant),+];

            /// Looks an action up by name.
            pub fn from_name(name: &str) -> Option<Action> {
                $(
                    if name == <actions::$module::$variant as ActionSpec>::NAME {
                        return Some(Action::$variant);
                    }
                )+
                None
            }

            /// Its name on the wire.
            pub fn name(self) -> &'static str {
                match self {
                    $(Action::$variant => <actions::$module::$variant as ActionSpec>::NAME,)+
                }
            }

            /// Its REST route.
            pub fn route(self) -> Route {
                match self {
                    $(Action::$variant => <actions::$module::$variant as ActionSpec>::ROUTE,)+
                }
            }

            /// The JSON Schemas of its `data` (None: takes none) and of its answer's `data`.
            pub fn schemas(self, g: &mut SchemaGenerator) -> (Option<Schema>, Schema) {
                match self {
                    $(Action::$variant => (
                        <actions::$module::$variant as ActionSpec>::data_schema(g),
                        g.subschema_for::<<actions::$module::$variant as ActionSpec>::Response>(),
                    ),)+
                }
            }
        }

        /// Every REST route, one per action, in the order of the list.
        pub const REST_ROUTES: &[RestRoute] = &[
            $(RestRoute {
                method: <actions::$module::$variant as ActionSpec>::ROUTE.method,
                path: <actions::$module::$variant as ActionSpec>::ROUTE.path,
                action: <actions::$module::$variant as ActionSpec>::NAME,
                summary: <actions::$module::$variant as ActionSpec>::ROUTE.summary,
            },)+
        ];

        /// A checked request of any action.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Request {
            $(
                #[doc = concat!("See [`actions::", stringify!($module), "`].")]
                $variant(<actions::$module::$variant as ActionSpec>::Request),
            )+
        }

        impl Request {
            /// Parses and checks the `data` of `action`.
            pub fn parse(action: Action, data: Option<&RawValue>) -> Result<Request, ProtocolError> {
                Ok(match action {
                    $(Action::$variant => Request::$variant(
                        <actions::$module::$variant as ActionSpec>::parse(data)?,
                    ),)+
                })
            }

            /// Its action.
            pub fn action(&self) -> Action {
                match self {
                    $(Request::$variant(_) => Action::$variant,)+
                }
            }

            /// Its `data`, as JSON (what [`Request::parse`] reads back as the same request).
            pub fn data(&self) -> serde_json::Result<String> {
                match self {
                    $(Request::$variant(r) => serde_json::to_string(r),)+
                }
            }

            /// Carries it out.
            pub fn handle(self, cx: &Context<'_>) -> Reply<Response> {
                match self {
                    $(Request::$variant(r) => {
                        <actions::$module::$variant as ActionSpec>::handle(cx, r)
                            .map(Response::$variant)
                    })+
                }
            }
        }

        /// The answer's `data` of any action (written as the action's own shape).
        #[derive(Debug, Clone)]
        pub enum Response {
            $(
                #[doc = concat!("See [`actions::", stringify!($module), "`].")]
                $variant(<actions::$module::$variant as ActionSpec>::Response),
            )+
        }

        impl Response {
            /// Its action.
            pub fn action(&self) -> Action {
                match self {
                    $(Response::$variant(_) => Action::$variant,)+
                }
            }

            /// Reads the answer's `data` (JSON) to `action`.
            pub fn parse(action: Action, data: &str) -> serde_json::Result<Response> {
                Ok(match action {
                    $(Action::$variant => Response::$variant(serde_json::from_str(data)?),)+
                })
            }
        }

        impl Serialize for Response {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                match self {
                    $(Response::$variant(r) => r.serialize(serializer),)+
                }
            }
        }
    };
}

// The list: one line per action, in the order of the REST table and the docs.
actions! {
    ListDevices in list_devices,
    GetStatus in get_status,
    GetUsage in get_usage,
    GetAllocations in get_allocations,
    Allocate in allocate,
    Deallocate in deallocate,
    Clear in clear,
    Defragment in defragment,
    Transfer in transfer,
    GetTransfer in get_transfer,
    Optimize in optimize,
    ModelLoad in model_load,
    ModelUnload in model_unload,
    ModelAcquire in model_acquire,
    ModelRelease in model_release,
    ModelRenew in model_renew,
    ModelStatus in model_status,
    ModelOptimize in model_optimize,
    GetPressure in get_pressure,
    Analytics in analytics,
    OptimizationRecs in optimization_recs,
    Export in export,
    Unexport in unexport,
    ListExports in list_exports,
    ListSessions in list_sessions,
    Hello in hello,
}

// The checked requests (defined in `service::requests`, parsed in the action files), where
// callers have always found them.
pub use actions::allocate::AllocateRequest;
pub use actions::analytics::AnalyticsRequest;
pub use actions::clear::ClearRequest;
pub use actions::deallocate::DeallocateRequest;
pub use actions::export::ExportRequest;
pub use actions::get_allocations::GetAllocationsRequest;
pub use actions::get_pressure::OptionalDeviceRequest;
pub use actions::get_status::GetStatusRequest;
pub use actions::get_transfer::TransferIdRequest;
pub use actions::get_usage::DeviceRequest;
pub use actions::hello::HelloRequest;
pub use actions::model_acquire::ModelAcquireRequest;
pub use actions::model_load::ModelLoadRequest;
pub use actions::model_optimize::{ModelOptimizeRequest, ModelStrategy};
pub use actions::model_release::LeaseRequest;
pub use actions::model_renew::RenewRequest;
pub use actions::model_status::ModelStatusRequest;
pub use actions::model_unload::ModelRequest;
pub use actions::optimize::OptimizeRequest;
pub use actions::transfer::{TransferMode, TransferRequest};
pub use actions::unexport::ExportIdRequest;
