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

/// How many rows of two `[T, V]` logit tensors pick the same greedy token, and `T`.
pub fn argmax_agreement(got: &Tensor, want: &Tensor) -> (usize, usize) {
    let rows = got.to_vec2::<f32>().unwrap();
    let refs = want.to_vec2::<f32>().unwrap();
    let agree = rows
        .iter()
        .zip(&refs)
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    (agree, rows.len())
}

/// The prompt of an oracle fixture (`input_ids` in its `oracle.safetensors`).
pub fn input_ids(oracle: &std::collections::HashMap<String, Tensor>) -> Vec<u32> {
    oracle["input_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

/// transformers' greedy continuation of an oracle fixture (`greedy_ids` in `dir/oracle.json`).
pub fn greedy_ids(dir: &std::path::Path) -> Vec<u32> {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("oracle.json")).unwrap()).unwrap();
    j["greedy_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Loads every rank of `dir` split over `world` ranks with `opts`, each on its own thread
/// (ranks meet in the communicator's collectives, so they cannot share one), runs `f` on each
/// and returns what every rank returned, in rank order.
pub fn on_ranks<R: Send>(
    dir: &std::path::Path,
    world: usize,
    opts: &switchyard_model::LoadOptions,
    f: impl Fn(&switchyard_model::HyV3Model) -> R + Sync,
) -> Vec<R> {
    let comms = switchyard_model::parallel::InProcessGroup::new(world)
        .with_timeout(std::time::Duration::from_secs(300))
        .build();
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let m = switchyard_model::HyV3Model::load_dir_parallel(
                        dir,
                        opts,
                        std::sync::Arc::new(c),
                    )
                    .unwrap();
                    f(&m)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
