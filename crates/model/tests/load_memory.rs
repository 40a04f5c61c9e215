//! Loading a checkpoint must not hold the mapped file and the loaded copy at the same time:
//! for a 295B-parameter model that is the difference between fitting in RAM and not. This test
//! writes a 256 MiB checkpoint of 32 tensors, loads every tensor through [`Checkpoint`], and
//! checks the growth of the process's peak resident memory (`VmHWM`): about 1× the weights
//! (the copies plus one tensor's pages) with the mapped pages handed back, 2× without.
//!
//! Alone in its test binary, so no other test moves the peak. Linux only (`/proc`).

#![cfg(target_os = "linux")]

use std::io::Write;

use candle_core::{DType, Device};
use switchyard_model::Checkpoint;

const TENSORS: usize = 32;
/// 2 Mi f32 = 8 MiB per tensor.
const ELEMS: usize = 2 << 20;

/// Peak resident set size of this process, in bytes.
fn vm_hwm() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/self/status");
    kb * 1024
}

#[test]
fn peak_memory_while_loading_stays_near_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    // Write the file in pieces so writing it does not raise the peak.
    let tensor_bytes = ELEMS * 4;
    let mut header = serde_json::Map::new();
    for i in 0..TENSORS {
        header.insert(
            format!("t{i}"),
            serde_json::json!({"dtype": "F32", "shape": [ELEMS],
                               "data_offsets": [i * tensor_bytes, (i + 1) * tensor_bytes]}),
        );
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    let chunk: Vec<u8> = (0..ELEMS)
        .flat_map(|j| (j as f32 * 1e-3).to_le_bytes())
        .collect();
    for _ in 0..TENSORS {
        f.write_all(&chunk).unwrap();
    }
    f.into_inner().unwrap().sync_all().unwrap();
    drop(chunk);

    let before = vm_hwm();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let loaded: Vec<_> = (0..TENSORS)
        .map(|i| {
            ckpt.get(&format!("t{i}"), &[ELEMS], DType::F32, &Device::Cpu)
                .unwrap()
        })
        .collect();
    let grown = vm_hwm().saturating_sub(before);
    let weights = (TENSORS * tensor_bytes) as u64;
    // The values came through intact.
    let last = loaded[TENSORS - 1].narrow(0, 1000, 1).unwrap();
    assert_eq!(last.to_vec1::<f32>().unwrap(), vec![1000.0 * 1e-3]);
    let ratio = grown as f64 / weights as f64;
    eprintln!(
        "loading {} MiB raised the peak RSS by {} MiB ({ratio:.2}x)",
        weights >> 20,
        grown >> 20
    );
    assert!(
        ratio < 1.4,
        "peak RSS grew by {ratio:.2}x the weights while loading (mapped pages kept resident?)"
    );
}
