//! `switchyard plan` as a user runs it: the JSON contract of DESIGN.md (`weights_total_bytes`,
//! per-device bytes, `kv_tokens`, `fits`), weight bytes equal to the checkpoint's tensor bytes,
//! and bad flags refused with a message naming the flag.

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
