//! Streamed responses: translating upstream events into the client's wire format while
//! tracking usage, and the [`UpstreamStream`] handed to the server.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::Stream;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::sse::SseEvent;
use super::translate::{finish_reason_from_anthropic, openai_usage, stop_reason_from_openai};
use super::UpstreamError;
use crate::cost::Usage;
use crate::request::WireFormat;

/// Turns upstream events into client events. One per stream.
#[derive(Debug)]
pub struct StreamTranslator {
    upstream: WireFormat,
    client: WireFormat,
    client_wants_usage: bool,
    usage: Usage,
    id: String,
    model: String,
    created: u64,
    started: bool,
    block_open: bool,
    finish: Option<String>,
    done: bool,
}

fn parse(data: &str) -> Result<Value, String> {
    serde_json::from_str(data).map_err(|e| format!("malformed event JSON ({e})"))
}

impl StreamTranslator {
    /// A translator from `upstream` events to `client` events; `client_wants_usage` is the
    /// OpenAI client's `stream_options.include_usage`.
    pub fn new(
        upstream: WireFormat,
        client: WireFormat,
        client_wants_usage: bool,
        model: &str,
        created: u64,
    ) -> Self {
        StreamTranslator {
            upstream,
            client,
            client_wants_usage,
            usage: Usage::default(),
            id: format!("sy-{created:x}"),
            model: model.to_string(),
            created,
            started: false,
            block_open: false,
            finish: None,
            done: false,
        }
    }

    /// Usage seen so far.
    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// Whether the upstream signalled a complete response.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Translates one upstream event; an error means the upstream broke the stream.
    pub fn on_event(&mut self, ev: SseEvent) -> Result<Vec<SseEvent>, String> {
        match self.upstream {
            WireFormat::OpenAi => self.on_openai_event(ev),
            WireFormat::Anthropic => self.on_anthropic_event(ev),
        }
    }

    fn openai_chunk(&self, delta: Value, finish: Option<&str>) -> SseEvent {
        SseEvent::data(
            json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            .to_string(),
        )
    }

    fn on_openai_event(&mut self, ev: SseEvent) -> Result<Vec<SseEvent>, String> {
        if ev.data.trim() == "[DONE]" {
            self.done = true;
            return Ok(match self.client {
                WireFormat::OpenAi => vec![ev],
                WireFormat::Anthropic => self.anthropic_tail(),
            });
        }
        let v = parse(&ev.data)?;
        if let Some(err) = v.get("error") {
            return Err(format!(
                "upstream error event: {}",
                err.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
            ));
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            self.usage = Usage::from_openai(u);
        }
        if let Some(m) = v.get("model").and_then(Value::as_str) {
            self.model = m.to_string();
        }
        let choices_empty = v
            .get("choices")
            .and_then(Value::as_array)
            .is_none_or(|c| c.is_empty());
        match self.client {
            WireFormat::OpenAi => {
                // A usage-only chunk exists because the router asked for usage; pass it on
                // only if the client asked too.
                if choices_empty && v.get("usage").is_some() && !self.client_wants_usage {
                    Ok(Vec::new())
                } else {
                    Ok(vec![ev])
                }
            }
            WireFormat::Anthropic => {
                let mut out = Vec::new();
                if !self.started {
                    self.started = true;
                    out.push(SseEvent::named(
                        "message_start",
                        json!({"type": "message_start", "message": {
                        "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                        "content": [], "stop_reason": null, "stop_sequence": null,
                        "usage": {"input_tokens": 0, "output_tokens": 0}}})
                        .to_string(),
                    ));
                }
                if let Some(text) = v
                    .pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                {
                    if !text.is_empty() {
                        if !self.block_open {
                            self.block_open = true;
                            out.push(SseEvent::named(
                                "content_block_start",
                                json!({"type": "content_block_start", "index": 0,
                                "content_block": {"type": "text", "text": ""}})
                                .to_string(),
                            ));
                        }
                        out.push(SseEvent::named(
                            "content_block_delta",
                            json!({"type": "content_block_delta", "index": 0,
                            "delta": {"type": "text_delta", "text": text}})
                            .to_string(),
                        ));
                    }
                }
                if let Some(f) = v
                    .pointer("/choices/0/finish_reason")
                    .and_then(Value::as_str)
                {
                    self.finish = Some(f.to_string());
                }
                Ok(out)
            }
        }
    }

    fn anthropic_tail(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            out.push(SseEvent::named(
                "message_start",
                json!({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0}}})
                .to_string(),
            ));
        }
        if self.block_open {
            self.block_open = false;
            out.push(SseEvent::named(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}).to_string(),
            ));
        }
        out.push(SseEvent::named("message_delta", json!({"type": "message_delta",
            "delta": {"stop_reason": stop_reason_from_openai(self.finish.as_deref()), "stop_sequence": null},
            "usage": {"input_tokens": self.usage.input_tokens, "output_tokens": self.usage.output_tokens,
                      "cache_read_input_tokens": self.usage.cached_input_tokens}}).to_string()));
        out.push(SseEvent::named(
            "message_stop",
            json!({"type": "message_stop"}).to_string(),
        ));
        out
    }

    fn on_anthropic_event(&mut self, ev: SseEvent) -> Result<Vec<SseEvent>, String> {
        let v = parse(&ev.data)?;
        let kind = ev
            .event
            .clone()
            .or_else(|| v.get("type").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_default();
        match kind.as_str() {
            "error" => {
                return Err(format!(
                    "upstream error event: {}",
                    v.pointer("/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                ))
            }
            "message_start" => {
                if let Some(u) = v.pointer("/message/usage") {
                    let out_tokens = self.usage.output_tokens;
                    self.usage = Usage::from_anthropic(u);
                    self.usage.output_tokens = self.usage.output_tokens.max(out_tokens);
                }
                if let Some(m) = v.pointer("/message/model").and_then(Value::as_str) {
                    self.model = m.to_string();
                }
                if let Some(id) = v.pointer("/message/id").and_then(Value::as_str) {
                    self.id = id.to_string();
                }
            }
            "message_delta" => {
                if let Some(o) = v.pointer("/usage/output_tokens").and_then(Value::as_u64) {
                    self.usage.output_tokens = o;
                }
                if let Some(s) = v.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.finish = Some(s.to_string());
                }
            }
            "message_stop" => self.done = true,
            _ => {}
        }
        match self.client {
            WireFormat::Anthropic => Ok(vec![ev]),
            WireFormat::OpenAi => {
                let mut out = Vec::new();
                match kind.as_str() {
                    "message_start" => {
                        self.started = true;
                        out.push(
                            self.openai_chunk(json!({"role": "assistant", "content": ""}), None),
                        );
                    }
                    "content_block_delta" => {
                        if let Some(t) = v.pointer("/delta/text").and_then(Value::as_str) {
                            out.push(self.openai_chunk(json!({"content": t}), None));
                        }
                    }
                    "message_delta" => {
                        let f = finish_reason_from_anthropic(self.finish.as_deref());
                        out.push(self.openai_chunk(json!({}), Some(f)));
                    }
                    "message_stop" => {
                        if self.client_wants_usage {
                            out.push(SseEvent::data(
                                json!({"id": self.id, "object": "chat.completion.chunk",
                                "created": self.created, "model": self.model, "choices": [],
                                "usage": openai_usage(&self.usage)})
                                .to_string(),
                            ));
                        }
                        out.push(SseEvent::data("[DONE]"));
                    }
                    _ => {}
                }
                Ok(out)
            }
        }
    }
}

/// What a finished stream reports back (read after the stream ends).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamSummary {
    /// Usage reported by the upstream.
    pub usage: Usage,
    /// Cost at the tier's prices.
    pub cost_usd: f64,
    /// Whether the upstream completed the response.
    pub completed: bool,
    /// The error that ended it, if any.
    pub error: Option<String>,
}

/// Events of a streamed upstream response, already in the client's wire format. A failure after
/// the first event arrives as one `Err` item ([`UpstreamError::Stream`]) and ends the stream.
///
/// Dropping it cancels the upstream request (the reader task stops at its next send).
pub struct UpstreamStream {
    pub(crate) first: Option<SseEvent>,
    pub(crate) rx: mpsc::Receiver<Result<SseEvent, UpstreamError>>,
    pub(crate) summary: Arc<Mutex<StreamSummary>>,
}

impl std::fmt::Debug for UpstreamStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamStream").finish_non_exhaustive()
    }
}

impl UpstreamStream {
    /// Usage, cost and completion as known so far (final once the stream has ended).
    pub fn summary(&self) -> StreamSummary {
        self.summary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A shared handle to the summary, for reading after the stream has been moved into a
    /// response body.
    pub fn summary_handle(&self) -> Arc<Mutex<StreamSummary>> {
        self.summary.clone()
    }
}

impl Stream for UpstreamStream {
    type Item = Result<SseEvent, UpstreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(ev) = self.first.take() {
            return Poll::Ready(Some(Ok(ev)));
        }
        self.rx.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_stream_to_anthropic_events() {
        let mut t =
            StreamTranslator::new(WireFormat::OpenAi, WireFormat::Anthropic, false, "gpt", 1);
        let mut out = Vec::new();
        for d in [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":2}}"#,
            "[DONE]",
        ] {
            out.extend(t.on_event(SseEvent::data(d)).unwrap());
        }
        let names: Vec<_> = out.iter().map(|e| e.event.clone().unwrap()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert!(t.is_done());
        assert_eq!(t.usage().output_tokens, 2);
        assert!(out[5].data.contains("end_turn"));
    }

    #[test]
    fn anthropic_stream_to_openai_chunks() {
        let mut t =
            StreamTranslator::new(WireFormat::Anthropic, WireFormat::OpenAi, true, "claude", 1);
        let mut out = Vec::new();
        for (e, d) in [
            (
                "message_start",
                r#"{"type":"message_start","message":{"id":"m1","model":"claude","usage":{"input_tokens":9,"output_tokens":1}}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            ),
            ("ping", r#"{"type":"ping"}"#),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            ),
            (
                "content_block_stop",
                r#"{"type":"content_block_stop","index":0}"#,
            ),
            (
                "message_delta",
                r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":5}}"#,
            ),
            ("message_stop", r#"{"type":"message_stop"}"#),
        ] {
            out.extend(t.on_event(SseEvent::named(e, d)).unwrap());
        }
        assert_eq!(out.last().unwrap().data, "[DONE]");
        let usage: Value = serde_json::from_str(&out[out.len() - 2].data).unwrap();
        assert_eq!(usage["usage"]["prompt_tokens"], 9);
        assert_eq!(usage["usage"]["completion_tokens"], 5);
        assert!(out[1].data.contains("\"Hi\""));
        assert!(t.is_done());
    }

    #[test]
    fn error_and_garbage_events_break_the_stream() {
        let mut t =
            StreamTranslator::new(WireFormat::Anthropic, WireFormat::Anthropic, false, "c", 1);
        assert!(t
            .on_event(SseEvent::named(
                "error",
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
            ))
            .is_err());
        let mut t = StreamTranslator::new(WireFormat::OpenAi, WireFormat::OpenAi, false, "g", 1);
        assert!(t.on_event(SseEvent::data("{not json")).is_err());
    }
}
