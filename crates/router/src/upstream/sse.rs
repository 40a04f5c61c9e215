//! A minimal server-sent-events parser (the subset both providers emit: `event:`, `data:`,
//! comments, blank-line-terminated events; LF or CRLF line ends).

use serde::{Deserialize, Serialize};

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SseEvent {
    /// The `event:` field (Anthropic names every event; OpenAI names none).
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

impl SseEvent {
    /// A data-only event.
    pub fn data(data: impl Into<String>) -> Self {
        SseEvent {
            event: None,
            data: data.into(),
        }
    }

    /// A named event.
    pub fn named(event: &str, data: impl Into<String>) -> Self {
        SseEvent {
            event: Some(event.to_string()),
            data: data.into(),
        }
    }

    /// The wire form, ending in a blank line.
    pub fn to_wire(&self) -> String {
        let mut out = String::new();
        if let Some(e) = &self.event {
            out.push_str("event: ");
            out.push_str(e);
            out.push('\n');
        }
        for line in self.data.split('\n') {
            out.push_str("data: ");
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
        out
    }
}

/// Incremental parser: feed bytes as they arrive, take complete events.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    event: Option<String>,
    data: Vec<String>,
}

/// A single SSE line longer than this is treated as a broken upstream rather than buffered
/// without bound.
pub const MAX_SSE_LINE_BYTES: usize = 8 << 20;

impl SseParser {
    /// A fresh parser.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the events they complete, or an error for an oversized line.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if line.is_empty() {
                if !self.data.is_empty() || self.event.is_some() {
                    out.push(SseEvent {
                        event: self.event.take(),
                        data: std::mem::take(&mut self.data).join("\n"),
                    });
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_str(), ""),
            };
            match field {
                "event" => self.event = Some(value.to_string()),
                "data" => self.data.push(value.to_string()),
                _ => {}
            }
        }
        if self.buf.len() > MAX_SSE_LINE_BYTES {
            return Err(format!(
                "an event-stream line exceeded {MAX_SSE_LINE_BYTES} bytes"
            ));
        }
        Ok(out)
    }

    /// Whether a partial event is buffered (the stream ended mid-event).
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty() || !self.data.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_split_chunks_and_crlf() {
        let mut p = SseParser::new();
        assert!(p
            .feed(b"event: message_start\r\ndata: {\"a\"")
            .unwrap()
            .is_empty());
        let ev = p
            .feed(b":1}\r\n\r\n: ping\n\ndata: x\ndata: y\n\n")
            .unwrap();
        assert_eq!(
            ev,
            vec![
                SseEvent::named("message_start", "{\"a\":1}"),
                SseEvent::data("x\ny")
            ]
        );
        assert!(!p.has_partial());
        assert_eq!(SseEvent::data("x\ny").to_wire(), "data: x\ndata: y\n\n");
    }
}
