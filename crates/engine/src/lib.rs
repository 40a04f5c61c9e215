//! placeholder

pub mod stop;
pub mod tokenizer;
