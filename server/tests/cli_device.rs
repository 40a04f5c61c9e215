//! `--device` and `--dtype auto` on the real binary: the CPU is chosen without a GPU, `auto`
//! means f32 there (the same tokens as an explicit `--dtype f32`), and devices this build cannot
//! open are refused with a sentence naming the flag instead of silently running elsewhere.

mod common;

use common::{bench_json, generate_json, generated_ids as ids};

fn generate(extra: &[&str]) -> (bool, String, String) {
    generate_json(&[&["--input-ids", "5,9,13,2", "--max-tokens", "6"], extra].concat())
}

#[test]
fn auto_runs_on_the_cpu_in_f32_like_the_explicit_flags() {
    let (ok, auto, err) = generate(&[]);
    assert!(ok, "{err}");
    let (ok, explicit, err) = generate(&["--device", "cpu", "--dtype", "f32"]);
    assert!(ok, "{err}");
    assert_eq!(ids(&auto).len(), 6);
    assert_eq!(ids(&auto), ids(&explicit));
    // bf16 is a different computation; it must still run when asked for on the CPU.
    let (ok, _, err) = generate(&["--device", "cpu", "--dtype", "bf16"]);
    assert!(ok, "{err}");
}

#[test]
fn bench_reports_the_device_and_dtype_it_ran() {
    let v = bench_json(&["--dtype", "bf16"]);
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["dtype"], "bf16");
    assert!(v["decode_tok_s"].as_f64().expect("decode_tok_s") > 0.0);
}

#[test]
fn devices_that_cannot_be_opened_are_named() {
    let (ok, _, err) = generate(&["--device", "tpu"]);
    assert!(!ok);
    assert!(
        err.contains("--device") && err.contains("cpu, cuda, cuda:N or auto"),
        "{err}"
    );
    let (ok, _, err) = generate(&["--device", "cuda:x"]);
    assert!(!ok);
    assert!(err.contains("--device") && err.contains("\"x\""), "{err}");
    let (ok, _, err) = generate(&["--dtype", "f64"]);
    assert!(!ok);
    assert!(err.contains("--dtype") && err.contains("\"f64\""), "{err}");
    // Without the `cuda` feature an explicit GPU is refused, not replaced by the CPU. (A CUDA
    // build on a machine without a GPU fails to open it, which is also an error naming it.)
    let (ok, _, err) = generate(&["--device", "cuda:1"]);
    assert!(!ok);
    assert!(err.contains("--device cuda:1"), "{err}");
}
