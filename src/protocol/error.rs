//! The contract's error codes (the contract's section 7, docs/protocol.md) and the error every
//! layer above the managers converts into.

use std::fmt;

/// One row of the contract's error table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Not JSON, not an object, no `action`, a bad `request_id`, a `data` that is not an object.
    InvalidRequest,
    /// A line or body over the size limit.
    RequestTooLarge,
    /// An `action` this version does not have.
    UnknownAction,
    /// A field missing, of the wrong type or out of range.
    InvalidParameter,
    /// An unknown device id.
    InvalidDevice,
    /// An unknown allocation id.
    AllocationNotFound,
    /// The allocation belongs to a model, or is being transferred.
    AllocationInUse,
    /// Not enough memory, after waiting and reclaiming what policy allows.
    OutOfMemory,
    /// Unknown `transfer_id`.
    TransferNotFound,
    /// Same source and destination, or the allocation is not on the source.
    InvalidTransferParams,
    /// The copy failed; the source is intact.
    TransferFailed,
    /// Unknown model.
    ModelNotFound,
    /// The model file is missing, outside the model root or not valid safetensors.
    ModelLoadFailed,
    /// Unload of a model that is loading or leased, without `force`.
    ModelInUse,
    /// Unknown `lease_id`.
    LeaseNotFound,
    /// The worker is stopping; the request was not carried out.
    ShuttingDown,
    /// HTTP: a token is required and was missing or wrong.
    Unauthorized,
    /// HTTP: a known route with the wrong method.
    MethodNotAllowed,
    /// A bug; the worker keeps serving.
    InternalError,
    /// Extension (not in the contract's table): the session or HTTP client already has as many
    /// requests in flight as allowed (`--max-in-flight`); this one was not carried out.
    TooManyRequests,
    /// v1.1 (section 8.7): an unknown or ended `export_id`.
    ExportNotFound,
    /// v1.1 (section 8.7): the request would take the tenant past its quota on the device.
    QuotaExceeded,
}

impl ErrorCode {
    /// Every code, in the order of the contract's table, then this version's extensions.
    pub const ALL: [ErrorCode; 22] = [
        ErrorCode::InvalidRequest,
        ErrorCode::RequestTooLarge,
        ErrorCode::UnknownAction,
        ErrorCode::InvalidParameter,
        ErrorCode::InvalidDevice,
        ErrorCode::AllocationNotFound,
        ErrorCode::AllocationInUse,
        ErrorCode::OutOfMemory,
        ErrorCode::TransferNotFound,
        ErrorCode::InvalidTransferParams,
        ErrorCode::TransferFailed,
        ErrorCode::ModelNotFound,
        ErrorCode::ModelLoadFailed,
        ErrorCode::ModelInUse,
        ErrorCode::LeaseNotFound,
        ErrorCode::ShuttingDown,
        ErrorCode::Unauthorized,
        ErrorCode::MethodNotAllowed,
        ErrorCode::InternalError,
        ErrorCode::TooManyRequests,
        ErrorCode::ExportNotFound,
        ErrorCode::QuotaExceeded,
    ];

    /// The code as it appears in `error_code`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::RequestTooLarge => "REQUEST_TOO_LARGE",
            ErrorCode::UnknownAction => "UNKNOWN_ACTION",
            ErrorCode::InvalidParameter => "INVALID_PARAMETER",
            ErrorCode::InvalidDevice => "INVALID_DEVICE",
            ErrorCode::AllocationNotFound => "ALLOCATION_NOT_FOUND",
            ErrorCode::AllocationInUse => "ALLOCATION_IN_USE",
            ErrorCode::OutOfMemory => "OUT_OF_MEMORY",
            ErrorCode::TransferNotFound => "TRANSFER_NOT_FOUND",
            ErrorCode::InvalidTransferParams => "INVALID_TRANSFER_PARAMS",
            ErrorCode::TransferFailed => "TRANSFER_FAILED",
            ErrorCode::ModelNotFound => "MODEL_NOT_FOUND",
            ErrorCode::ModelLoadFailed => "MODEL_LOAD_FAILED",
            ErrorCode::ModelInUse => "MODEL_IN_USE",
            ErrorCode::LeaseNotFound => "LEASE_NOT_FOUND",
            ErrorCode::ShuttingDown => "SHUTTING_DOWN",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::InternalError => "INTERNAL_ERROR",
            ErrorCode::TooManyRequests => "TOO_MANY_REQUESTS",
            ErrorCode::ExportNotFound => "EXPORT_NOT_FOUND",
            ErrorCode::QuotaExceeded => "QUOTA_EXCEEDED",
        }
    }

    /// The `status_code` (an HTTP status) that goes with the code.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest
            | ErrorCode::InvalidParameter
            | ErrorCode::InvalidTransferParams => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::QuotaExceeded => 403,
            ErrorCode::UnknownAction
            | ErrorCode::InvalidDevice
            | ErrorCode::AllocationNotFound
            | ErrorCode::TransferNotFound
            | ErrorCode::ModelNotFound
            | ErrorCode::LeaseNotFound
            | ErrorCode::ExportNotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::AllocationInUse | ErrorCode::ModelInUse => 409,
            ErrorCode::RequestTooLarge => 413,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::ModelLoadFailed => 422,
            ErrorCode::TransferFailed | ErrorCode::InternalError => 500,
            ErrorCode::OutOfMemory | ErrorCode::ShuttingDown => 503,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed request as the protocol reports it: a code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProtocolError {
    /// The contract's error code.
    pub code: ErrorCode,
    /// What went wrong, naming the device, sizes in human units, the field at fault.
    pub message: String,
}

impl ProtocolError {
    /// A new error with the given code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
        }
    }

    /// `INVALID_PARAMETER` naming a field.
    pub fn invalid_parameter(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidParameter, message)
    }

    /// `INVALID_REQUEST`.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_contract_table() {
        let table: Vec<(&str, u16)> = ErrorCode::ALL
            .iter()
            .map(|c| (c.as_str(), c.status()))
            .collect();
        assert_eq!(
            table,
            vec![
                ("INVALID_REQUEST", 400),
                ("REQUEST_TOO_LARGE", 413),
                ("UNKNOWN_ACTION", 404),
                ("INVALID_PARAMETER", 400),
                ("INVALID_DEVICE", 404),
                ("ALLOCATION_NOT_FOUND", 404),
                ("ALLOCATION_IN_USE", 409),
                ("OUT_OF_MEMORY", 503),
                ("TRANSFER_NOT_FOUND", 404),
                ("INVALID_TRANSFER_PARAMS", 400),
                ("TRANSFER_FAILED", 500),
                ("MODEL_NOT_FOUND", 404),
                ("MODEL_LOAD_FAILED", 422),
                ("MODEL_IN_USE", 409),
                ("LEASE_NOT_FOUND", 404),
                ("SHUTTING_DOWN", 503),
                ("UNAUTHORIZED", 401),
                ("METHOD_NOT_ALLOWED", 405),
                ("INTERNAL_ERROR", 500),
                ("TOO_MANY_REQUESTS", 429),
                ("EXPORT_NOT_FOUND", 404),
                ("QUOTA_EXCEEDED", 403),
            ]
        );
    }
}
