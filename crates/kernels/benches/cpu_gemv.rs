//! Bytes/s of the CPU bf16 weight-streaming matmul at decode sizes (`cargo bench -p
//! switchyard-kernels --bench cpu_gemv`). Compare with the machine's memory bandwidth
//! (`switchyard bench` prints it): decode speed is this number over the active weight bytes.
//! From eight tokens on, the AMX tile kernels run where the CPU has them; `SWITCHYARD_AMX=0`
//! measures the row kernels instead.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use switchyard_kernels::cpu_gemv::gemv_bf16;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemv_bf16");
    for &(out, inp, tokens) in &[
        (4096usize, 4096usize, 1usize),
        (1536, 576, 1),
        (4096, 4096, 8),
        (1024, 1024, 16),
        (2048, 1024, 64),
        (1024, 1024, 128),
    ] {
        // Several weight copies so the working set exceeds the last-level cache.
        let copies = (256 << 20) / (out * inp * 2) + 1;
        let ws: Vec<Vec<bf16>> = (0..copies)
            .map(|k| {
                (0..out * inp)
                    .map(|i| bf16::from_f32(((i * 7 + k) % 13) as f32 * 0.01 - 0.06))
                    .collect()
            })
            .collect();
        let x: Vec<f32> = (0..tokens * inp)
            // bf16 values, as a bf16 model's hidden states are (the tiles need them exact).
            .map(|i| bf16::from_f32((i % 17) as f32 * 0.1 - 0.8).to_f32())
            .collect();
        let mut y = vec![0f32; tokens * out];
        g.throughput(Throughput::Bytes((out * inp * 2) as u64));
        let mut k = 0;
        g.bench_function(format!("{out}x{inp}_t{tokens}"), |b| {
            b.iter(|| {
                k = (k + 1) % copies;
                gemv_bf16(&x, tokens, &ws[k], out, inp, &mut y).unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
