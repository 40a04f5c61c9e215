//! placeholder

pub mod sampling;
pub mod stop;
pub mod tokenizer;
