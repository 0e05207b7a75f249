//! The one place where every error a client can meet becomes an HTTP status and a JSON-RPC error.
//!
//! The mapping is an exhaustive `match` with no catch-all arm, so a new error variant cannot ship
//! without a decision about what the client sees. Internal detail goes to the log, not to the client.

use http::{Response, StatusCode};
use serde_json::{Value, json};

use crate::body::{self, Body};
use crate::gate::Refusal;
use crate::jsonrpc::{self, ParseError, code};
use crate::session::SessionError;
use crate::upstream;

/// Everything that can stop a request at the gateway.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("reading the request body failed: {0}")]
    BodyRead(String),
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("origin {0:?} is not allowed")]
    OriginForbidden(String),
    #[error("the request body is larger than the {0}-byte limit")]
    BodyTooLarge(usize),
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("the Accept header must allow {0}")]
    NotAcceptable(&'static str),
    #[error("protocol version {0:?} is not supported")]
    UnsupportedVersion(String),
    #[error("the {0} header does not match the request body")]
    HeaderMismatch(&'static str),
    #[error("the X-Request-Id header must be 1 to 128 characters of letters, digits and - _ . : / + =")]
    BadRequestId,
    #[error("this request needs the Mcp-Session-Id header from initialize")]
    MissingSession,
    #[error("session not found; it ended or never existed: initialize again")]
    SessionNotFound,
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Upstream(#[from] upstream::Error),
    #[error(transparent)]
    Gate(#[from] Refusal),
}

impl Error {
    /// The HTTP status, JSON-RPC code and client-facing message (and data) for this error.
    pub fn classify(&self) -> (StatusCode, i64, String, Option<Value>) {
        let msg = self.to_string();
        match self {
            Error::Parse(ParseError::Json(_)) => (StatusCode::BAD_REQUEST, code::PARSE_ERROR, msg, None),
            Error::Parse(ParseError::Batch) | Error::Parse(ParseError::Invalid(_)) => {
                (StatusCode::BAD_REQUEST, code::INVALID_REQUEST, msg, None)
            }
            Error::BodyRead(_) => (StatusCode::BAD_REQUEST, code::INVALID_REQUEST, msg, None),
            Error::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, code::INVALID_REQUEST, msg, None),
            Error::OriginForbidden(_) => (StatusCode::FORBIDDEN, code::ORIGIN_FORBIDDEN, msg, None),
            Error::BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, code::BODY_TOO_LARGE, msg, None),
            Error::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, code::NOT_ACCEPTABLE, msg, None),
            Error::NotAcceptable(_) => (StatusCode::NOT_ACCEPTABLE, code::NOT_ACCEPTABLE, msg, None),
            Error::UnsupportedVersion(v) => (
                StatusCode::BAD_REQUEST,
                code::UNSUPPORTED_PROTOCOL_VERSION,
                msg,
                Some(json!({ "supported": jsonrpc::SUPPORTED_VERSIONS, "requested": v })),
            ),
            Error::HeaderMismatch(_) => (StatusCode::BAD_REQUEST, code::HEADER_MISMATCH, msg, None),
            Error::MissingSession | Error::BadRequestId => (StatusCode::BAD_REQUEST, code::INVALID_REQUEST, msg, None),
            Error::SessionNotFound => (StatusCode::NOT_FOUND, code::SESSION_NOT_FOUND, msg, None),
            Error::Session(SessionError::TooMany(_)) => (StatusCode::SERVICE_UNAVAILABLE, code::UNAVAILABLE, msg, None),
            Error::Gate(r) => match r {
                Refusal::MissingKey => (StatusCode::UNAUTHORIZED, code::KEY_MISSING, msg, None),
                Refusal::UnknownKey => (StatusCode::UNAUTHORIZED, code::KEY_UNKNOWN, msg, None),
                Refusal::Revoked => (StatusCode::FORBIDDEN, code::KEY_REVOKED, msg, None),
                Refusal::Suspended => (StatusCode::FORBIDDEN, code::KEY_SUSPENDED, msg, None),
                Refusal::Expired => (StatusCode::FORBIDDEN, code::KEY_EXPIRED, msg, None),
                Refusal::ToolForbidden(_) => (StatusCode::FORBIDDEN, code::TOOL_FORBIDDEN, msg, None),
                Refusal::IpForbidden(_) => (StatusCode::FORBIDDEN, code::IP_FORBIDDEN, msg, None),
                Refusal::Limit(crate::ledger::DebitError::SpendingLimit { .. }) => {
                    (StatusCode::PAYMENT_REQUIRED, code::SPENDING_LIMIT, msg, None)
                }
                Refusal::Limit(_) => (StatusCode::TOO_MANY_REQUESTS, code::QUOTA_EXCEEDED, msg, None),
                Refusal::RateLimited { retry_after_ms, .. } => (
                    StatusCode::TOO_MANY_REQUESTS,
                    code::RATE_LIMITED,
                    msg,
                    Some(json!({ "retryAfterMs": retry_after_ms })),
                ),
                Refusal::Insufficient { available, needed } => (
                    StatusCode::PAYMENT_REQUIRED,
                    code::INSUFFICIENT_CREDITS,
                    msg,
                    Some(json!({ "available": available, "needed": needed })),
                ),
                Refusal::LedgerUnavailable => (StatusCode::SERVICE_UNAVAILABLE, code::LEDGER_UNAVAILABLE, msg, None),
                Refusal::PolicyDenied(_) => (StatusCode::FORBIDDEN, code::POLICY_DENIED, msg, None),
                Refusal::PolicyFailed => (StatusCode::INTERNAL_SERVER_ERROR, code::INTERNAL_ERROR, msg, None),
            },
            // The exchange reached the gateway and the JSON-RPC error says what happened upstream, so
            // SDKs surface the code and message; HTTP-level answers only where the transport needs one.
            Error::Upstream(e) => match e {
                upstream::Error::Unavailable(_) => (StatusCode::OK, code::UPSTREAM_UNAVAILABLE, msg, None),
                upstream::Error::Timeout(_) => (StatusCode::OK, code::UPSTREAM_TIMEOUT, msg, None),
                upstream::Error::Protocol(_) => (
                    StatusCode::OK,
                    code::UPSTREAM_PROTOCOL,
                    "the upstream answered with invalid MCP".to_string(),
                    None,
                ),
                upstream::Error::Closed => (StatusCode::OK, code::UPSTREAM_CLOSED, msg, None),
                upstream::Error::SessionGone => (StatusCode::NOT_FOUND, code::SESSION_NOT_FOUND, msg, None),
                upstream::Error::NoStream => (StatusCode::METHOD_NOT_ALLOWED, code::METHOD_NOT_FOUND, msg, None),
            },
        }
    }

    /// The response a client gets for this error, answering the request with `id`.
    pub fn into_response(self, id: Value) -> Response<Body> {
        let (status, code, message, data) = self.classify();
        if status.is_server_error() || matches!(self, Error::Upstream(_)) {
            tracing::warn!(error = %self, code, "request failed");
        } else {
            tracing::debug!(error = %self, code, "request refused");
        }
        let body = serde_json::to_vec(&jsonrpc::error_response(id, code, &message, data)).expect("JSON serializes");
        let mut resp = body::json(status, body);
        if let Error::Gate(Refusal::RateLimited { retry_after_ms, .. }) = &self {
            let secs = retry_after_ms.div_ceil(1000).max(1);
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            resp.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("POST, DELETE"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_codes_never_collide_with_the_ones_sdks_and_the_spec_use() {
        // -32000/-32001: SDK connection-closed / timeout; -32002: resource not found;
        // -32020..-32022 and -32042: MCP 2026-07-28 codes with their own meaning.
        let reserved = [-32000, -32001, -32002, -32021, -32042];
        let errors = [
            Error::OriginForbidden("x".into()),
            Error::BodyTooLarge(1),
            Error::SessionNotFound,
            Error::Upstream(upstream::Error::Unavailable("x".into())),
            Error::Upstream(upstream::Error::Timeout(std::time::Duration::from_secs(1))),
            Error::Upstream(upstream::Error::Closed),
            Error::Upstream(upstream::Error::Protocol("x".into())),
        ];
        for e in errors {
            let (_, code, _, _) = e.classify();
            assert!(!reserved.contains(&code), "{code}");
        }
    }

    #[test]
    fn an_unsupported_version_names_the_supported_ones() {
        let (status, code, _, data) = Error::UnsupportedVersion("2099-01-01".into()).classify();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(code, -32022);
        assert_eq!(data.unwrap()["supported"][0], "2024-11-05");
    }

    #[test]
    fn upstream_internals_do_not_reach_the_client() {
        let (_, _, message, _) = Error::Upstream(upstream::Error::Protocol("secret detail".into())).classify();
        assert!(!message.contains("secret detail"));
    }
}
