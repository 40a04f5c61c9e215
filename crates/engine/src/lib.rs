//! The generation engine: tokenizer and chat templates, sampling, speculative drafts, KV block
//! management, the continuous-batching scheduler and the loop that owns the model.

pub mod block_pool;
pub mod chat;
pub mod engine;
pub mod generation_config;
pub mod parallel;
pub mod reasoning;
pub mod sampling;
pub mod scheduler;
pub mod speculative;
pub mod stop;
pub mod structured;
pub mod tokenizer;
pub mod tool_calls;
