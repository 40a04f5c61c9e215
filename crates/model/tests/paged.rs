//! The paged (batched, block-table) forward against the contiguous single-sequence forward:
//! several sequences of different lengths, prefilled in chunks together and then decoded
//! together, with a block size that splits prompts mid-block and scattered block tables.

use std::path::Path;

use candle_core::{Device, Tensor};
use switchyard_model::{HyV3Model, KvDtype, LoadOptions, Logits, PagedSeq};

mod common;
use common::max_abs;

#[test]
fn paged_batch_matches_contiguous_per_sequence() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oracle/e192_k8");
    let m = HyV3Model::load_dir(
        &dir,
        &LoadOptions {
            device: Device::Cpu,
            ..Default::default()
        },
    )
    .unwrap();
    let prompts: Vec<Vec<u32>> = vec![
        (0..11).map(|i| (i * 7 + 3) % 200).collect(),
        (0..4).map(|i| (i * 13 + 5) % 200).collect(),
        (0..17).map(|i| (i * 29 + 1) % 200).collect(),
    ];
    let decode_steps = 5;
    let bs = 3;
    // Reference: each sequence alone, contiguous cache, greedy-free (fixed continuation tokens).
    let cont: Vec<u32> = vec![9, 41, 77, 120, 3];
    let mut want: Vec<Vec<Tensor>> = Vec::new();
    for p in &prompts {
        let mut c = m.new_cache();
        let mut rows = vec![m.forward(p, &mut c, Logits::All).unwrap()];
        for &t in &cont[..decode_steps] {
            rows.push(m.forward(&[t], &mut c, Logits::Last).unwrap());
        }
        want.push(rows);
    }
    // Paged: blocks handed out in a scrambled order; prefill in chunks of 5 tokens per step.
    let mut kv = m.new_paged_cache(64, bs, KvDtype::F32);
    let mut next_block = (0..64u32).rev().collect::<Vec<_>>();
    let mut tables: Vec<Vec<u32>> = vec![vec![]; prompts.len()];
    let mut done = vec![0usize; prompts.len()];
    let mut got: Vec<Vec<Tensor>> = vec![vec![]; prompts.len()];
    let chunk = 5;
    loop {
        let mut step: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let total = p.len() + decode_steps;
            if done[i] >= total {
                continue;
            }
            let toks: Vec<u32> = if done[i] < p.len() {
                p[done[i]..(done[i] + chunk).min(p.len())].to_vec()
            } else {
                vec![cont[done[i] - p.len()]]
            };
            while tables[i].len() * bs < done[i] + toks.len() {
                tables[i].push(next_block.pop().unwrap());
            }
            step.push((i, toks));
        }
        if step.is_empty() {
            break;
        }
        let seqs: Vec<PagedSeq> = step
            .iter()
            .map(|(i, t)| PagedSeq {
                tokens: t,
                pos0: done[*i],
                block_table: &tables[*i],
                logits: if done[*i] < prompts[*i].len() {
                    Logits::All
                } else {
                    Logits::Last
                },
            })
            .collect();
        let out = m.forward_paged(&seqs, &mut kv).unwrap();
        for ((i, t), o) in step.iter().zip(out) {
            got[*i].push(o);
            done[*i] += t.len();
        }
    }
    let mut worst = 0f32;
    for i in 0..prompts.len() {
        let g = Tensor::cat(&got[i], 0).unwrap();
        let w = Tensor::cat(&want[i], 0).unwrap();
        let d = max_abs(&g, &w);
        worst = worst.max(d);
    }
    println!("paged vs contiguous max|Δ| = {worst:.2e}");
    assert!(worst <= 1e-5, "paged forward differs by {worst}");
}
