//! The Responses API's stored responses: what `previous_response_id` continues from and what
//! `GET /v1/responses/{id}` returns. OpenAI stores responses unless a request says
//! `store: false`; here they live in memory, bounded by count and bytes (the oldest go first)
//! and gone after a restart.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde_json::Value;

/// Most responses kept: an agent's conversation needs only its latest response, so this is
/// many concurrent conversations.
const MAX_RESPONSES: usize = 4096;
/// Most bytes kept (conversations and response objects as JSON text): a bound on memory that
/// long conversations cannot pass.
const MAX_BYTES: usize = 256 << 20;

/// One stored response.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The conversation up to and including this response's answer, as chat messages (without
    /// the request's `instructions`, which a continuation does not inherit).
    pub conversation: Vec<Value>,
    /// The `response` object as it was returned.
    pub response: Value,
    bytes: usize,
}

/// Stored responses by id.
#[derive(Debug, Default)]
pub struct ResponseStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<String, Stored>,
    /// Ids oldest first (ids already removed are skipped when evicting).
    order: VecDeque<String>,
    bytes: usize,
}

impl ResponseStore {
    /// Keeps a response, evicting the oldest while over the bounds.
    pub fn put(&self, id: String, conversation: Vec<Value>, response: Value) {
        let bytes = conversation
            .iter()
            .map(|m| m.to_string().len())
            .sum::<usize>()
            + response.to_string().len();
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        if bytes > MAX_BYTES {
            return;
        }
        if let Some(old) = g.by_id.remove(&id) {
            g.bytes -= old.bytes;
        }
        while g.by_id.len() >= MAX_RESPONSES || g.bytes + bytes > MAX_BYTES {
            let Some(oldest) = g.order.pop_front() else {
                break;
            };
            if let Some(old) = g.by_id.remove(&oldest) {
                g.bytes -= old.bytes;
            }
        }
        g.bytes += bytes;
        g.order.push_back(id.clone());
        g.by_id.insert(
            id,
            Stored {
                conversation,
                response,
                bytes,
            },
        );
    }

    /// A stored response.
    pub fn get(&self, id: &str) -> Option<Stored> {
        self.inner.lock().ok()?.by_id.get(id).cloned()
    }

    /// Forgets a response; whether it was there.
    pub fn remove(&self, id: &str) -> bool {
        let Ok(mut g) = self.inner.lock() else {
            return false;
        };
        match g.by_id.remove(id) {
            Some(old) => {
                g.bytes -= old.bytes;
                g.order.retain(|i| i != id);
                true
            }
            None => false,
        }
    }

    /// How many are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().map_or(0, |g| g.by_id.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keeps_the_newest_within_the_count_bound() {
        let s = ResponseStore::default();
        for i in 0..MAX_RESPONSES + 10 {
            s.put(
                format!("resp_{i}"),
                vec![json!({"role": "user", "content": "x"})],
                json!({"id": i}),
            );
        }
        assert_eq!(s.len(), MAX_RESPONSES);
        assert!(s.get("resp_0").is_none() && s.get("resp_9").is_none());
        assert_eq!(
            s.get("resp_10").map(|r| r.response),
            Some(json!({"id": 10}))
        );
        assert!(s.remove("resp_10"));
        assert!(!s.remove("resp_10"));
        assert!(s.get("resp_10").is_none());
    }

    #[test]
    fn keeps_the_newest_within_the_byte_bound() {
        let s = ResponseStore::default();
        let big = "x".repeat(MAX_BYTES / 3);
        for i in 0..5 {
            s.put(format!("r{i}"), vec![json!(big)], json!({}));
        }
        // Each takes a third of the budget and a little more: two fit.
        assert_eq!(s.len(), 2);
        assert!(s.get("r4").is_some() && s.get("r3").is_some() && s.get("r2").is_none());
        s.put(
            "huge".into(),
            vec![json!("y".repeat(MAX_BYTES + 1))],
            json!({}),
        );
        assert!(
            s.get("huge").is_none(),
            "larger than the whole budget: not kept"
        );
    }
}
