//! `switchyard plan` as a user runs it: the JSON contract of DESIGN.md (`weights_total_bytes`,
//! per-device bytes, `kv_tokens`, `fits`), weight bytes equal to the checkpoint's tensor bytes
//! (and, on the CPU, to what the quantized model holds once loaded), bad flags refused with a
//! message naming the flag, and the loader refusing weights the machine's memory cannot hold.

mod common;

use std::path::Path;
use std::process::Command;

use common::BIN;
use serde_json::Value;

fn run(args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["plan"];
    all.extend_from_slice(args);
    common::run_cli(&all)
}

/// Tensor bytes of a single-file safetensors checkpoint: the file minus its 8-byte length
/// prefix and JSON header.
fn tensor_bytes(file: &Path) -> u64 {
    let bytes = std::fs::read(file).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    bytes.len() as u64 - 8 - header
}

#[test]
fn plan_json_matches_the_checkpoint_and_the_contract() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_str().unwrap();
    let out = Command::new(BIN)
        .args([
            "make-test-model",
            "--preset",
            "tiny",
            "--dtype",
            "bf16",
            "--out",
            dir,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, stdout, stderr) = run(&[
        "--model",
        dir,
        "--gpus",
        "2",
        "--gpu-memory",
        "1GiB",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let stored = tensor_bytes(&d.path().join("model.safetensors"));
    assert_eq!(v["weights_total_bytes"].as_u64(), Some(stored));
    let devices = v["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    let per_device: u64 = devices
        .iter()
        .map(|x| x["weights_bytes"].as_u64().unwrap())
        .sum();
    // Two GPUs hold everything once plus the replicated norms and gate: a bit more in all.
    assert!(
        per_device > stored && per_device < stored * 11 / 10,
        "{per_device} vs {stored}"
    );
    let kv = v["kv_tokens"].as_u64().unwrap();
    assert_eq!(
        kv,
        devices
            .iter()
            .map(|x| x["kv_tokens"].as_u64().unwrap())
            .min()
            .unwrap()
    );
    assert_eq!(v["fits"], Value::Bool(true));
    // The tiny model's bf16 KV: 2 × 4 layers × 1 KV head per GPU × head_dim 16 × 2 bytes.
    assert_eq!(
        v["kv_bytes_per_token_per_device"].as_u64(),
        Some(2 * 4 * 16 * 2)
    );

    // Too little memory: does not fit, and says why in words.
    let (ok, stdout, _) = run(&["--model", dir, "--gpu-memory", "1MiB"]);
    assert!(ok);
    assert!(stdout.contains("does not fit: GPU 0 needs"), "{stdout}");
}

/// `plan --device cpu --weights q4|q8` gives the bytes `bench --quantize` measures on the
/// loaded model, and the KV cache the engine would size by default.
#[test]
fn cpu_plan_matches_the_quantized_model_as_loaded() {
    let dir = common::model_dir().to_str().unwrap().to_string();
    for q in ["q8", "q4"] {
        let (ok, stdout, stderr) = run(&[
            "--model",
            &dir,
            "--device",
            "cpu",
            "--weights",
            q,
            "--memory",
            "1GiB",
            "--max-context",
            "256",
            "--json",
        ]);
        assert!(ok, "{stderr}");
        let v: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["device"], "cpu");
        assert_eq!(v["weights_format"], q);
        assert_eq!(v["fits"], Value::Bool(true), "{stdout}");
        let planned = v["weights_total_bytes"].as_u64().unwrap();
        let measured = common::bench_json(&["--quantize", q])["weights_bytes"]
            .as_f64()
            .unwrap();
        assert_eq!(planned as f64, measured, "{q}");
        let per_token = v["kv_bytes_per_token_per_device"].as_u64().unwrap();
        let kv = ((1u64 << 30) - planned) / 4 / per_token / 16 * 16;
        assert_eq!(v["kv_tokens"].as_u64(), Some(kv), "{q}");
        let (ok, text, _) = run(&["--model", &dir, "--device", "cpu", "--weights", q]);
        assert!(ok);
        assert!(text.contains("CPU with") && text.contains(q), "{text}");
    }
}

/// `switchyard generate --model dir --device cpu --prompt hi` with `extra` flags.
fn generate_on_cpu(dir: &str, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "generate", "--model", dir, "--device", "cpu", "--prompt", "hi",
    ];
    args.extend_from_slice(extra);
    common::run_cli(&args)
}

/// A model whose weights exceed the machine's available memory is refused before a weight is
/// read, with the sizes and what would fit; here the tiny model's config claims a vocabulary
/// of 2^31 tokens (a 512 GiB f32 embedding).
#[test]
fn loading_more_weights_than_memory_is_refused_before_reading_them() {
    let d = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        let from = common::model_dir().join(f);
        if from.is_file() {
            std::fs::copy(&from, d.path().join(f)).unwrap();
        }
    }
    let cfg_path = d.path().join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["vocab_size"] = Value::from(1u64 << 31);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    // No safetensors at all: a loader that read weights first would fail on those instead.
    let dir = d.path().to_str().unwrap();
    let t = std::time::Instant::now();
    let (ok, _, stderr) = generate_on_cpu(dir, &[]);
    assert!(!ok);
    assert!(
        stderr.contains("the model's weights need")
            && stderr.contains("GiB this machine has available"),
        "{stderr}"
    );
    assert!(stderr.contains("as f32 (--dtype f32)"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(t.elapsed().as_secs() < 30, "took {:?}", t.elapsed());
    let (ok, _, stderr) = generate_on_cpu(dir, &["--quantize", "q4"]);
    assert!(!ok);
    assert!(stderr.contains("as q4 (--quantize q4)"), "{stderr}");
    assert!(stderr.contains("use a host with more memory"), "{stderr}");
}

/// A KV cache budget beyond the memory left after loading is refused when the server starts,
/// not granted as untouched pages that would run out under load.
#[test]
fn a_kv_cache_beyond_the_available_memory_is_refused() {
    let dir = common::model_dir().to_str().unwrap().to_string();
    let (ok, _, stderr) = generate_on_cpu(&dir, &["--kv-cache-memory", "1024TiB"]);
    assert!(!ok);
    assert!(
        stderr.contains("--kv-cache-memory 1048576.0 GiB is more than the")
            && stderr.contains("available after loading the model"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // A budget that fits still runs.
    let (ok, _, stderr) =
        generate_on_cpu(&dir, &["--max-tokens", "2", "--kv-cache-memory", "16MiB"]);
    assert!(ok, "{stderr}");
}

#[test]
fn bad_flags_are_named() {
    for (args, needle) in [
        (vec!["--preset", "hy3", "--gpus", "6"], "--gpus"),
        (
            vec!["--preset", "hy3", "--gpu-memory", "eighty"],
            "--gpu-memory",
        ),
        (vec!["--preset", "hy3", "--weights", "int3"], "--weights"),
        (vec!["--preset", "hy3", "--kv-dtype", "q4"], "--kv-dtype"),
        (
            vec!["--preset", "hy3", "--gpu-memory-utilization", "0"],
            "--gpu-memory-utilization",
        ),
        (vec!["--preset", "small", "--with-mtp"], "--with-mtp"),
        (vec!["--preset", "hy3", "--device", "tpu"], "--device"),
        (vec!["--preset", "hy3", "--weights", "q4"], "--weights: q4"),
        (vec!["--preset", "hy3", "--memory", "1TiB"], "--memory"),
        (
            vec![
                "--preset",
                "hy3",
                "--device",
                "cpu",
                "--gpu-memory",
                "80GiB",
            ],
            "--gpu-memory",
        ),
        (
            vec!["--preset", "hy3", "--device", "cpu", "--memory", "lots"],
            "--memory",
        ),
        (
            vec!["--preset", "hy3", "--device", "cpu", "--gpus", "2"],
            "--gpus",
        ),
        (vec!["--preset", "huge"], "preset"),
        (vec!["--model", "/no/such/dir"], "/no/such/dir"),
    ] {
        let (ok, _, stderr) = run(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_closed_stdout_ends_the_command_without_a_panic() {
    // `switchyard plan --json | head -c0`: the reader is gone before the plan is printed.
    let mut child = Command::new(BIN)
        .args(["plan", "--preset", "hy3", "--gpus", "8", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
