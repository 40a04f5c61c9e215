//! `--tensor-parallel-size` (alias `-tp`) on the real binary: `generate` and `logits` split over
//! 2 and 4 CPU ranks give the tokens (and logits within 1e-4) of one rank, `serve` answers a
//! chat completion with the content of one rank, `bench` runs, and a size the model cannot be
//! split by is refused naming the flag and the config field.

mod common;

use common::{
    bench_json, generate_json, generated_ids as ids, model_arg, post, run_cli as run, Opts, Server,
};
use serde_json::json;

fn generate(extra: &[&str]) -> (bool, String, String) {
    let fixed = [
        "--input-ids",
        "5,9,13,2,77,300",
        "--max-tokens",
        "12",
        "--ignore-eos",
    ];
    generate_json(&[&fixed[..], extra].concat())
}

#[test]
fn generate_split_over_ranks_equals_one_rank() {
    let (ok, one, err) = generate(&["--tensor-parallel-size", "1"]);
    assert!(ok, "{err}");
    assert_eq!(ids(&one).len(), 12);
    let (ok, two, err) = generate(&["--tensor-parallel-size", "2"]);
    assert!(ok, "{err}");
    assert!(err.contains("tensor parallel: 2 ranks"), "{err}");
    assert_eq!(ids(&two), ids(&one));
    let (ok, four, err) = generate(&["-tp", "4"]);
    assert!(ok, "{err}");
    assert_eq!(ids(&four), ids(&one));
}

#[test]
fn logits_split_over_ranks_equal_one_rank() {
    let dir = model_arg();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut outs = Vec::new();
    for tp in ["1", "2"] {
        let out = tmp.path().join(format!("logits-{tp}.safetensors"));
        let (ok, _, err) = run(&[
            "logits",
            "--model",
            &dir,
            "--input-ids",
            "1,2,3,400,17",
            "--tensor-parallel-size",
            tp,
            "--out",
            out.to_str().expect("utf-8 path"),
        ]);
        assert!(ok, "{err}");
        let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).expect("load");
        outs.push(t["logits"].clone());
    }
    assert_eq!(outs[0].dims(), outs[1].dims());
    let d = (&outs[0] - &outs[1])
        .and_then(|t| t.abs())
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar::<f32>())
        .expect("diff");
    assert!(d <= 1e-4, "logits differ by {d}");
}

#[test]
fn bench_runs_split_over_ranks() {
    let v = bench_json(&["--tensor-parallel-size", "2"]);
    assert!(v["decode_tok_s"].as_f64().is_some_and(|x| x > 0.0), "{v}");
}

#[test]
fn a_size_the_model_cannot_split_by_names_the_flag_and_field() {
    // The tiny model has 4 query heads.
    let (ok, _, err) = generate(&["--tensor-parallel-size", "3"]);
    assert!(!ok);
    assert!(
        err.contains("num_attention_heads 4 is not divisible by --tensor-parallel-size 3"),
        "{err}"
    );
    let (ok, _, err) = generate(&["--tensor-parallel-size", "0"]);
    assert!(!ok);
    assert!(err.contains("--tensor-parallel-size"), "{err}");
}

#[tokio::test]
async fn serve_split_over_ranks_answers_as_one_rank() {
    let body = json!({"model": "local", "max_tokens": 10, "temperature": 0, "ignore_eos": true,
                      "messages": [{"role": "user", "content": "hello there"}]});
    let mut contents = Vec::new();
    for tp in ["1", "2"] {
        let s = Server::start_with(Opts {
            args: &["--tensor-parallel-size", tp],
            ..Default::default()
        });
        let v = post(&s, "/v1/chat/completions", body.clone(), &[])
            .await
            .json();
        let c = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_else(|| panic!("tp={tp}: {v}"))
            .to_string();
        assert_eq!(v["usage"]["completion_tokens"], 10, "tp={tp}: {v}");
        contents.push(c);
    }
    assert_eq!(contents[0], contents[1]);
}
