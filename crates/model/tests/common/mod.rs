//! Helpers shared by the model's integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use candle_core::Tensor;

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Index of the largest value (the first on ties), as greedy decoding picks it.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}
