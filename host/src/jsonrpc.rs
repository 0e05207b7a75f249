//! JSON-RPC 2.0 messages as MCP uses them: parsing, classification, and the error codes Tollgate speaks.
//!
//! A message is kept as the JSON object it arrived as (`serde_json::Map`), so fields Tollgate does not
//! know pass through untouched; only `id`, `method`, `params._meta.progressToken` and friends are read
//! or rewritten.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

/// The MCP protocol revisions Tollgate speaks with its clients, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];
/// The newest revision in [`SUPPORTED_VERSIONS`]; what Tollgate asks its stdio upstream for.
pub const LATEST_VERSION: &str = "2025-11-25";
/// What a request without an `MCP-Protocol-Version` header is taken to speak (transport spec).
pub const DEFAULT_HEADER_VERSION: &str = "2025-03-26";

/// Whether Tollgate speaks this protocol revision.
pub fn is_supported_version(v: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&v)
}

/// Standard JSON-RPC and MCP error codes, and Tollgate's own (the table in README.md).
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    /// MCP 2026-07-28: an `Mcp-Method` / `Mcp-Name` / version header disagrees with the body.
    pub const HEADER_MISMATCH: i64 = -32020;
    /// MCP 2026-07-28: the requested protocol revision is not supported; `data.supported` lists ours.
    pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;
    /// No API key on a request that needs one (HTTP 401).
    pub const KEY_MISSING: i64 = -32003;
    /// The API key is not known (HTTP 401).
    pub const KEY_UNKNOWN: i64 = -32004;
    /// The API key is revoked (HTTP 403).
    pub const KEY_REVOKED: i64 = -32005;
    /// The API key is suspended (HTTP 403).
    pub const KEY_SUSPENDED: i64 = -32006;
    /// The API key has expired (HTTP 403).
    pub const KEY_EXPIRED: i64 = -32008;
    /// The API key may not call this tool (HTTP 403).
    pub const TOOL_FORBIDDEN: i64 = -32009;
    /// The API key is not accepted from the client's address (HTTP 403).
    pub const IP_FORBIDDEN: i64 = -32010;
    /// A rate limit was reached (HTTP 429, with `Retry-After`); `data.retryAfterMs` says when.
    pub const RATE_LIMITED: i64 = -32011;
    /// The key's spending limit would be passed (HTTP 402).
    pub const SPENDING_LIMIT: i64 = -32012;
    /// A daily or monthly quota of the key is used up (HTTP 429).
    pub const QUOTA_EXCEEDED: i64 = -32013;
    /// The ledger cannot record charges (HTTP 503).
    pub const LEDGER_UNAVAILABLE: i64 = -32007;
    /// The pricing plugin refused the call (its reason is in the message).
    pub const POLICY_DENIED: i64 = -32014;
    /// Not enough credits for the call (HTTP 402); `data` has `available` and `needed`.
    pub const INSUFFICIENT_CREDITS: i64 = -32402;
    /// The upstream MCP server is not running or cannot be reached.
    pub const UPSTREAM_UNAVAILABLE: i64 = -32030;
    /// The upstream did not answer within the configured call timeout.
    pub const UPSTREAM_TIMEOUT: i64 = -32031;
    /// The upstream answered something that is not valid MCP.
    pub const UPSTREAM_PROTOCOL: i64 = -32032;
    /// The upstream went away while the call was in flight.
    pub const UPSTREAM_CLOSED: i64 = -32033;
    /// The `Mcp-Session-Id` names no live session (HTTP 404).
    pub const SESSION_NOT_FOUND: i64 = -32034;
    /// The request's `Origin` is not allowed (HTTP 403).
    pub const ORIGIN_FORBIDDEN: i64 = -32035;
    /// The request body is larger than the configured limit (HTTP 413).
    pub const BODY_TOO_LARGE: i64 = -32036;
    /// The request's `Accept` or `Content-Type` cannot be served (HTTP 406 / 415).
    pub const NOT_ACCEPTABLE: i64 = -32037;
    /// The client cancelled the request.
    pub const REQUEST_CANCELLED: i64 = -32038;
    /// The gateway is shutting down or at its session limit (HTTP 503).
    pub const UNAVAILABLE: i64 = -32039;
}

/// What kind of JSON-RPC message an object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Has `method` and `id`: expects an answer.
    Request,
    /// Has `method`, no `id`.
    Notification,
    /// Has `id` and `result` or `error`.
    Response,
}

/// Why a body is not a single JSON-RPC message.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("body is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("JSON-RPC batches are not supported (MCP removed batching in 2025-06-18); send one message per POST")]
    Batch,
    #[error("{0}")]
    Invalid(&'static str),
}

/// The members of a JSON-RPC message as they come off the wire. `params`, `result` and `error`
/// stay raw JSON text: the gateway reads inside them only when it must, and forwards them as is.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    jsonrpc: Option<Cow<'a, str>>,
    #[serde(default, deserialize_with = "present")]
    id: Option<Value>,
    method: Option<Value>,
    params: Option<Box<RawValue>>,
    result: Option<Box<RawValue>>,
    error: Option<Box<RawValue>>,
}

/// Keeps `"id": null` apart from a missing id (`Some(Null)` versus `None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// One JSON-RPC message. Only the envelope is decoded; the body parts stay raw JSON.
#[derive(Debug, Clone)]
pub struct Message {
    pub kind: Kind,
    id: Option<Value>,
    method: Option<String>,
    params: Option<Box<RawValue>>,
    result: Option<Box<RawValue>>,
    error: Option<Box<RawValue>>,
}

impl Message {
    /// Parses one message. Arrays (batches) and non-objects are refused with a reason.
    pub fn parse(body: &[u8]) -> Result<Message, ParseError> {
        match body.iter().find(|c| !c.is_ascii_whitespace()) {
            Some(b'{') => {}
            Some(b'[') => {
                // Still tell malformed JSON apart from a batch.
                serde_json::from_slice::<serde::de::IgnoredAny>(body)?;
                return Err(ParseError::Batch);
            }
            _ => {
                serde_json::from_slice::<serde::de::IgnoredAny>(body)?;
                return Err(ParseError::Invalid("a JSON-RPC message must be a JSON object"));
            }
        }
        let wire: Wire = serde_json::from_slice(body)?;
        if wire.jsonrpc.as_deref() != Some("2.0") {
            return Err(ParseError::Invalid(r#"the "jsonrpc" member must be "2.0""#));
        }
        let id = match wire.id {
            None => None,
            Some(id @ (Value::String(_) | Value::Number(_))) if !id.is_f64() => Some(id),
            Some(Value::Null) if wire.method.is_none() => Some(Value::Null),
            Some(_) => return Err(ParseError::Invalid(r#"the "id" member must be a string or an integer"#)),
        };
        let method = match wire.method {
            None => None,
            Some(Value::String(m)) => Some(m),
            Some(_) => return Err(ParseError::Invalid(r#"the "method" member must be a string"#)),
        };
        let kind = match (&method, &id) {
            (Some(_), Some(_)) => Kind::Request,
            (Some(_), None) => Kind::Notification,
            (None, Some(_)) if wire.result.is_some() || wire.error.is_some() => Kind::Response,
            (None, _) => {
                return Err(ParseError::Invalid(
                    r#"a JSON-RPC message needs a "method" (request or notification) or a "result"/"error" (response)"#,
                ));
            }
        };
        Ok(Message {
            kind,
            id,
            method,
            params: wire.params,
            result: wire.result,
            error: wire.error,
        })
    }

    /// A message from a JSON value built in the gateway (answers it makes itself).
    pub fn from_value(v: &Value) -> Message {
        Message::parse(&serde_json::to_vec(v).expect("JSON values serialize"))
            .expect("the gateway builds valid messages")
    }

    /// An error response.
    pub fn error(id: Value, code: i64, message: &str) -> Message {
        Message::from_value(&error_response(id, code, message, None))
    }

    pub fn id(&self) -> Option<&Value> {
        self.id.as_ref()
    }

    pub fn set_id(&mut self, id: Value) {
        self.id = Some(id);
    }

    pub fn method(&self) -> Option<&str> {
        self.method.as_deref()
    }

    /// Whether this is a response (the last message of an exchange).
    pub fn is_response(&self) -> bool {
        self.kind == Kind::Response
    }

    pub fn is_error(&self) -> bool {
        self.error.is_some()
    }

    /// The raw `params` text, if any.
    pub fn raw_params(&self) -> Option<&RawValue> {
        self.params.as_deref()
    }

    /// The size of the `result` text in bytes (0 when there is none).
    pub fn result_len(&self) -> usize {
        self.result.as_ref().map_or(0, |r| r.get().len())
    }

    /// The raw `result` text, if any.
    pub fn raw_result(&self) -> Option<&RawValue> {
        self.result.as_deref()
    }

    /// `params` decoded (a tree is built: for the paths that need to look inside).
    pub fn params_value(&self) -> Option<Map<String, Value>> {
        serde_json::from_str(self.params.as_ref()?.get()).ok()
    }

    /// `result` decoded as an object.
    pub fn result_value(&self) -> Option<Map<String, Value>> {
        serde_json::from_str(self.result.as_ref()?.get()).ok()
    }

    /// `params.<key>` as a string, e.g. the tool name of a `tools/call`.
    pub fn param_str(&self, key: &str) -> Option<String> {
        match self.params_value()?.remove(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// `params._meta.progressToken`, if the client asked for progress.
    pub fn progress_token(&self) -> Option<Value> {
        let raw = self.params.as_ref()?.get();
        if !raw.contains("progressToken") {
            return None;
        }
        self.params_value()?
            .remove("_meta")?
            .as_object_mut()?
            .remove("progressToken")
    }

    /// Replaces `params._meta.progressToken` (which must exist) and returns the old one.
    pub fn replace_progress_token(&mut self, token: Value) -> Option<Value> {
        let mut params = self.params_value()?;
        let old = params
            .get_mut("_meta")?
            .as_object_mut()?
            .insert("progressToken".into(), token)?;
        self.params = Some(serde_json::value::to_raw_value(&params).expect("JSON values serialize"));
        Some(old)
    }

    /// Replaces `params.progressToken` of a progress notification; returns the old one.
    pub fn replace_notification_token(&mut self, token: Value) -> Option<Value> {
        let mut params = self.params_value()?;
        let old = params.insert("progressToken".into(), token)?;
        self.params = Some(serde_json::value::to_raw_value(&params).expect("JSON values serialize"));
        Some(old)
    }

    /// The message as compact JSON text.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            64 + [&self.params, &self.result, &self.error]
                .iter()
                .map(|p| p.as_ref().map_or(0, |r| r.get().len()))
                .sum::<usize>(),
        );
        out.extend_from_slice(br#"{"jsonrpc":"2.0""#);
        if let Some(id) = &self.id {
            out.extend_from_slice(br#","id":"#);
            serde_json::to_writer(&mut out, id).expect("JSON values serialize");
        }
        if let Some(m) = &self.method {
            out.extend_from_slice(br#","method":"#);
            serde_json::to_writer(&mut out, m).expect("strings serialize");
        }
        for (name, part) in [
            (&b"params"[..], &self.params),
            (b"result", &self.result),
            (b"error", &self.error),
        ] {
            if let Some(raw) = part {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(name);
                out.extend_from_slice(b"\":");
                out.extend_from_slice(raw.get().as_bytes());
            }
        }
        out.push(b'}');
        out
    }
}

/// The body field that `Mcp-Name` mirrors for the methods that carry one (MCP 2026-07-28).
pub fn name_param_of(method: &str) -> Option<&'static str> {
    match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    }
}

/// A JSON-RPC error response object.
pub fn error_response(id: Value, code: i64, message: &str, data: Option<Value>) -> Value {
    let mut err = json!({ "code": code, "message": message });
    if let Some(data) = data {
        err["data"] = data;
    }
    json!({ "jsonrpc": "2.0", "id": id, "error": err })
}

/// A JSON-RPC success response object.
pub fn result_response(id: Value, result: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_a_notification_and_a_response_are_told_apart() {
        let req = Message::parse(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#).unwrap();
        assert_eq!(req.kind, Kind::Request);
        let note = Message::parse(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).unwrap();
        assert_eq!(note.kind, Kind::Notification);
        let resp = Message::parse(br#"{"jsonrpc":"2.0","id":"a","result":{}}"#).unwrap();
        assert_eq!(resp.kind, Kind::Response);
    }

    #[test]
    fn batches_and_malformed_messages_are_refused_with_a_reason() {
        assert!(matches!(Message::parse(b"[]"), Err(ParseError::Batch)));
        assert!(matches!(Message::parse(b"{"), Err(ParseError::Json(_))));
        assert!(matches!(
            Message::parse(br#"{"id":1,"method":"x"}"#),
            Err(ParseError::Invalid(_))
        ));
        assert!(matches!(
            Message::parse(br#"{"jsonrpc":"2.0","id":1.5,"method":"x"}"#),
            Err(ParseError::Invalid(_))
        ));
        assert!(matches!(
            Message::parse(br#"{"jsonrpc":"2.0","id":1}"#),
            Err(ParseError::Invalid(_))
        ));
    }

    #[test]
    fn the_progress_token_can_be_swapped_and_restored() {
        let mut m = Message::parse(
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","_meta":{"progressToken":"p"}}}"#,
        )
        .unwrap();
        let old = m.replace_progress_token(json!(7)).unwrap();
        assert_eq!(old, json!("p"));
        assert_eq!(m.progress_token(), Some(json!(7)));
        assert_eq!(m.param_str("name").as_deref(), Some("x"), "the rest of params is kept");
    }
}
