//! Server-Sent Events: framing the messages Tollgate sends, and an incremental parser for the streams
//! an HTTP upstream sends (any chunking, any line ending, comments and empty priming events).

use bytes::{Bytes, BytesMut};

/// One JSON-RPC message as an SSE `message` event. JSON that spans lines (pretty-printed by an
/// upstream) becomes one `data:` line per line, which the client joins back.
pub fn frame(json: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(json.len() + 24);
    b.extend_from_slice(b"event: message\n");
    for line in json.split(|&c| c == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        b.extend_from_slice(b"data: ");
        b.extend_from_slice(line);
        b.extend_from_slice(b"\n");
    }
    b.extend_from_slice(b"\n");
    b.freeze()
}

/// A comment frame, used as a keep-alive on long-lived streams.
pub const KEEPALIVE: &[u8] = b": keep-alive\n\n";

/// A parsed event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    pub event: Option<String>,
    pub data: String,
    pub id: Option<String>,
}

/// An incremental SSE parser: feed it chunks, take out complete events.
#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
    current: Event,
    has_data: bool,
    /// The last byte seen was a `\r`, so a `\n` that follows belongs to it.
    after_cr: bool,
}

impl Parser {
    pub fn new() -> Parser {
        Parser::default()
    }

    /// Feeds a chunk and returns the events it completed.
    pub fn push(&mut self, mut chunk: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        if self.after_cr && chunk.first() == Some(&b'\n') {
            chunk = &chunk[1..];
        }
        self.after_cr = false;
        while let Some(pos) = chunk.iter().position(|&c| c == b'\n' || c == b'\r') {
            self.buf.extend_from_slice(&chunk[..pos]);
            let line = std::mem::take(&mut self.buf);
            self.line(&line, &mut out);
            let was_cr = chunk[pos] == b'\r';
            chunk = &chunk[pos + 1..];
            if was_cr {
                if chunk.is_empty() {
                    self.after_cr = true;
                } else if chunk[0] == b'\n' {
                    chunk = &chunk[1..];
                }
            }
        }
        self.buf.extend_from_slice(chunk);
        out
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<Event>) {
        if line.is_empty() {
            if self.has_data || self.current.event.is_some() {
                out.push(std::mem::take(&mut self.current));
            }
            self.current = Event::default();
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            return;
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.find(':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (&line[..], ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.current.event = Some(value.to_string()),
            "id" => self.current.id = Some(value.to_string()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_and_line_endings_are_reassembled() {
        let mut p = Parser::new();
        let mut events = p.push(b"event: message\r\nda");
        events.extend(p.push(b"ta: {\"a\":1}\r"));
        events.extend(p.push(b"\n\r\n: comment\n\ndata: x\ndata: y\n\n"));
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].event.as_deref(), Some("message"));
        assert_eq!(events[0].data, "{\"a\":1}");
        assert_eq!(events[1].data, "x\ny");
    }

    #[test]
    fn an_empty_priming_event_has_empty_data_and_is_not_lost_or_invented() {
        let mut p = Parser::new();
        let events = p.push(b"id: 0\ndata:\n\n");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, "");
        assert_eq!(events[0].id.as_deref(), Some("0"));
    }

    #[test]
    fn a_multi_line_message_is_framed_as_several_data_lines() {
        let mut p = Parser::new();
        let events = p.push(&frame(b"{\n  \"a\": 1\n}"));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, "{\n  \"a\": 1\n}");
    }

    #[test]
    fn a_frame_parses_back_to_its_message() {
        let mut p = Parser::new();
        let events = p.push(&frame(br#"{"jsonrpc":"2.0"}"#));
        assert_eq!(events[0].data, r#"{"jsonrpc":"2.0"}"#);
    }
}
