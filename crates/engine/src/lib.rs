//! placeholder

pub mod block_pool;
pub mod chat;
pub mod engine;
pub mod parallel;
pub mod sampling;
pub mod scheduler;
pub mod stop;
pub mod tokenizer;
