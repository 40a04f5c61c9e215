//! `--device` and `--dtype auto` on the real binary: the CPU is chosen without a GPU, `auto`
//! means f32 there (the same tokens as an explicit `--dtype f32`), and devices this build cannot
//! open are refused with a sentence naming the flag instead of silently running elsewhere.

mod common;

use common::{model_dir, run_cli as run};
use serde_json::Value;

fn generate(extra: &[&str]) -> (bool, String, String) {
    let dir = model_dir().to_str().expect("utf-8 path").to_string();
    let mut args = vec![
        "generate",
        "--model",
        &dir,
        "--input-ids",
        "5,9,13,2",
        "--max-tokens",
        "6",
        "--json",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn ids(stdout: &str) -> Vec<u64> {
    let v: Value = serde_json::from_str(stdout.trim()).expect("generate --json prints JSON");
    v["generated_ids"]
        .as_array()
        .expect("generated_ids")
        .iter()
        .map(|x| x.as_u64().expect("id"))
        .collect()
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
    let dir = model_dir().to_str().expect("utf-8 path").to_string();
    let (ok, out, err) = run(&[
        "bench",
        "--model",
        &dir,
        "--prompt-len",
        "8",
        "--gen-len",
        "3",
        "--dtype",
        "bf16",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).expect("bench --json prints JSON");
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
