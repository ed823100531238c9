//! The OpenAPI 3.1 document of `memcoord serve` and the JSON Schema of the stdio messages, both
//! generated (schemars) from the Rust types the protocol parses requests into and serialises
//! answers from, and from the one list of actions (`api`), so neither can drift from the code.

use crate::api::{Action, REST_ROUTES};
use crate::protocol::{self as p, ErrorCode};
use schemars::generate::SchemaSettings;
use schemars::{Schema, SchemaGenerator};
use serde_json::{Map, Value, json};

/// Every action with the schema of its `data` (None: takes none) and of its answer's `data`
/// (each action's file says both: `api/actions/`).
pub fn action_schemas(action: &str, g: &mut SchemaGenerator) -> Option<(Option<Schema>, Schema)> {
    Action::from_name(action).map(|a| a.schemas(g))
}

/// Every action of the contract, in the order of its table.
pub fn actions() -> Vec<&'static str> {
    REST_ROUTES.iter().map(|r| r.action).collect()
}

fn error_codes() -> Vec<&'static str> {
    ErrorCode::ALL.iter().map(|c| c.as_str()).collect()
}

/// The response envelope with `data` of the given schema.
fn response_envelope(data: Value) -> Value {
    json!({
        "type": "object",
        "required": ["success", "request_id", "data", "error_code", "error_message", "status_code"],
        "properties": {
            "success": {"type": "boolean"},
            "request_id": {"type": ["string", "null"]},
            "data": {"anyOf": [data, {"type": "null"}]},
            "error_code": {"anyOf": [{"type": "string", "enum": error_codes()}, {"type": "null"}]},
            "error_message": {"type": ["string", "null"]},
            "status_code": {"type": "integer"}
        }
    })
}

fn generator(definitions_path: &str) -> SchemaGenerator {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = definitions_path.to_string().into();
    settings.into_generator()
}

fn path_params(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .collect()
}

/// The schema's properties (following one `$ref` into the generator's definitions).
fn properties(schema: &Value, defs: &Map<String, Value>) -> Map<String, Value> {
    let target = schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.rsplit('/').next())
        .and_then(|name| defs.get(name))
        .unwrap_or(schema);
    target
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn required(schema: &Value, defs: &Map<String, Value>) -> Vec<String> {
    let target = schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.rsplit('/').next())
        .and_then(|name| defs.get(name))
        .unwrap_or(schema);
    target
        .get("required")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The OpenAPI 3.1 document served at `/v1/openapi.json`.
pub fn document() -> Value {
    let mut g = generator("#/components/schemas/");
    let mut paths = Map::new();
    let mut ops: Vec<(String, String, Value)> = Vec::new();
    let mut schemas_of = Vec::new();
    for route in REST_ROUTES {
        if let Some((req, resp)) = action_schemas(route.action, &mut g) {
            schemas_of.push((route, req.map(Value::from), Value::from(resp)));
        }
    }
    let dashboard = Value::from(g.subschema_for::<p::DashboardState>());
    let defs: Map<String, Value> = g.take_definitions(true).into_iter().collect();
    for (route, req, resp) in schemas_of {
        let method = route.method.to_ascii_lowercase();
        let in_path = path_params(route.path);
        let mut parameters: Vec<Value> = in_path
            .iter()
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut op = json!({
            "operationId": route.action.trim_start_matches("memory."),
            "summary": route.summary,
            "description": format!("The `{}` action of the protocol. `data` comes from the path, the query string{} (see docs/protocol.md in the memcoord repository).", route.action, if method == "get" { "" } else { " and the JSON body" }),
            "responses": {
                "200": {"description": "success", "content": {"application/json": {"schema": response_envelope(resp)}}},
                "default": {"description": "an error envelope; HTTP status = status_code", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}}
            }
        });
        if let Some(req) = req {
            let props = properties(&req, &defs);
            let req_fields = required(&req, &defs);
            if method == "get" || method == "delete" {
                for (name, schema) in &props {
                    if in_path.contains(&name.as_str()) {
                        continue;
                    }
                    parameters.push(json!({
                        "name": name, "in": "query",
                        "required": req_fields.contains(name),
                        "schema": schema
                    }));
                }
            } else if in_path.is_empty() {
                op["requestBody"] = json!({
                    "required": true,
                    "content": {"application/json": {"schema": req}}
                });
            } else {
                // The path gives these fields: the body has the others (any it repeats are
                // overridden by the path).
                let body_props: Map<String, Value> = props
                    .into_iter()
                    .filter(|(name, _)| !in_path.contains(&name.as_str()))
                    .collect();
                let body_required: Vec<&String> = req_fields
                    .iter()
                    .filter(|f| !in_path.contains(&f.as_str()))
                    .collect();
                op["requestBody"] = json!({
                    "required": !body_required.is_empty(),
                    "content": {"application/json": {"schema": {
                        "type": "object",
                        "properties": body_props,
                        "required": body_required
                    }}}
                });
            }
        }
        op["parameters"] = Value::Array(parameters);
        ops.push((route.path.to_string(), method, op));
    }
    // `DELETE /v1/models/optimize` unloads a model named "optimize" (the static route would
    // otherwise shadow `/v1/models/{model_name}` for it).
    if let Some((_, _, unload)) = ops
        .iter()
        .find(|(path, method, _)| path == "/v1/models/{model_name}" && method == "delete")
    {
        let mut op = unload.clone();
        op["operationId"] = json!("model_unload_optimize");
        op["summary"] = json!("Unload the model named `optimize`");
        if let Some(params) = op["parameters"].as_array_mut() {
            params.retain(|p| p["in"] != "path");
        }
        ops.push(("/v1/models/optimize".into(), "delete".into(), op));
    }
    ops.push((
        "/v1/command".into(),
        "post".into(),
        json!({
            "operationId": "command",
            "summary": "Any action, as the stdio envelope: one request object in, one response object out",
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RequestEnvelope"}}}},
            "responses": {"default": {"description": "the response envelope; HTTP status = status_code", "content": {"application/json": {"schema": response_envelope(json!({}))}}}}
        }),
    ));
    ops.push((
        "/v1/dashboard/state".into(),
        "get".into(),
        json!({
            "operationId": "dashboard_state",
            "summary": "Everything the dashboard shows (memory maps, largest allocations, samples, models, transfers)",
            "parameters": [{"name": "buckets", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 4096, "default": 256}}],
            "responses": {"200": {"description": "success", "content": {"application/json": {"schema": response_envelope(dashboard)}}}}
        }),
    ));
    for (path, summary, content) in [
        ("/healthz", "Liveness: `ok` (no token needed)", "text/plain"),
        (
            "/metrics",
            "Prometheus metrics (OpenMetrics when asked for in Accept)",
            "text/plain",
        ),
        ("/", "The dashboard (HTML)", "text/html"),
        ("/v1/openapi.json", "This document", "application/json"),
    ] {
        ops.push((
            path.to_string(),
            "get".into(),
            json!({"summary": summary, "responses": {"200": {"description": "success", "content": {content: {}}}}}),
        ));
    }
    for (path, method, op) in ops {
        let entry = paths
            .entry(path)
            .or_insert_with(|| Value::Object(Map::new()));
        entry[method] = op;
    }
    let mut schemas = defs;
    schemas.insert(
        "ErrorEnvelope".into(),
        response_envelope(json!({"type": "null"})),
    );
    schemas.insert("RequestEnvelope".into(), request_envelope());
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "memcoord",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The memory coordinator's protocol over HTTP. Every route answers the protocol's response envelope with HTTP status = status_code. With --token-file, every route but /healthz needs `Authorization: Bearer <token>`."
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}
        },
        "security": [{}, {"bearer": []}],
        "paths": paths
    })
}

fn request_envelope() -> Value {
    json!({
        "type": "object",
        "required": ["request_id", "action"],
        "properties": {
            "request_id": {"type": "string", "minLength": 1, "maxLength": 256},
            "action": {"type": "string", "enum": actions()},
            "data": {"type": ["object", "null"]}
        }
    })
}

/// The JSON Schema (2020-12) of the stdio messages: one request line (`oneOf` per action, with
/// its `data`) and one response line. Kept in docs/protocol.schema.json.
pub fn stdio_schema() -> Value {
    let mut g = generator("#/$defs/");
    let mut requests = Vec::new();
    let mut responses = Vec::new();
    for action in actions() {
        if let Some((req, resp)) = action_schemas(action, &mut g) {
            let data = req.map_or(
                json!({"type": ["object", "null"]}),
                |r| json!({"anyOf": [Value::from(r), {"type": "null"}]}),
            );
            requests.push(json!({
                "title": action,
                "type": "object",
                "required": ["request_id", "action"],
                "properties": {
                    "request_id": {"type": "string", "minLength": 1, "maxLength": 256},
                    "action": {"const": action},
                    "data": data
                }
            }));
            responses.push(json!({"title": action, "$ref": format!("#/$defs/response:{action}")}));
            let envelope = response_envelope(Value::from(resp));
            g.definitions_mut()
                .insert(format!("response:{action}"), envelope);
        }
    }
    let defs: Map<String, Value> = g.take_definitions(true).into_iter().collect();
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://memcoord.dev/schema/protocol-v1.json",
        "title": "memcoord stdio protocol (v1): one JSON object per line",
        "$defs": defs,
        "oneOf": [
            {"title": "request", "oneOf": requests},
            {"title": "response", "anyOf": responses}
        ]
    })
}
