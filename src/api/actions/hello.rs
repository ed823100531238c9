//! `memory.hello` (the contract's section 8.2): `{token}` → `{session_id, tenant}`. Over stdio
//! or a Unix socket, the session's requests belong to the token's tenant from then on (what it
//! made before stays its earlier tenant's). Over HTTP, where each request carries its own
//! bearer token, it only says whose the token is. A token nobody has is UNAUTHORIZED and
//! changes nothing. Without tenants declared, any token is answered with the tenant
//! `default` (there is nothing to check it against). Answered at once.

use crate::api::parse::{non_empty, parse_data};
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::{ErrorCode, ProtocolError};
pub use crate::protocol::HelloResponse;
pub use crate::service::requests::HelloRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.hello`.
pub struct Hello;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "HelloRequest")]
struct HelloWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    token: Option<String>,
}

impl HelloRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: HelloWire = parse_data(data)?;
        Ok(HelloRequest {
            token: non_empty(w.token, "token")?.trim().to_string(),
        })
    }
}

impl ActionSpec for Hello {
    const NAME: &'static str = "memory.hello";
    const ROUTE: Route = Route::post(
        "/v1/hello",
        "Name the tenant of a session by its token (stdio, Unix socket)",
    );
    type Request = HelloRequest;
    type Response = HelloResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<HelloWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<HelloRequest, ProtocolError> {
        HelloRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: HelloRequest) -> Reply<HelloResponse> {
        let tenants = cx.service().tenants();
        // Without tenants there is no token to check: every request is `default`'s, and a
        // client that sends one anyway (the Python client's `token=`) carries on as before.
        let tenant = if tenants.declared() {
            match tenants.by_token(&r.token) {
                Some(t) => t,
                None => {
                    return Reply::Now(Err(ProtocolError::new(
                        ErrorCode::Unauthorized,
                        "the token is no tenant's: send the token of your tenant's token_file \
                         (the config file's [tenants.NAME]) or the operator's (--token-file)",
                    )));
                }
            }
        } else {
            std::sync::Arc::from(crate::domain::DEFAULT_TENANT)
        };
        let caller = cx.set_tenant(tenant);
        Reply::Now(Ok(HelloResponse {
            session_id: caller.session.map(|s| s.to_string()),
            tenant: caller.tenant.to_string(),
        }))
    }
}
