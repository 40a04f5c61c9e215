//! The RouteLLM evaluation data (per-prompt correctness of Mixtral-8x7B, the cheap MoE, and
//! GPT-4, the frontier model, on GSM8K and MMLU), its fixed train/test split, and the APGR
//! metric with its baselines, as `shared/data/README.md` defines them.
//!
//! - **Split**: a prompt is *test* when the first byte of `sha256(prompt)` is below `0x33`.
//! - **Curve**: sort prompts by a router's score, send the top `k` to the strong model for
//!   `k = 0..=n`; quality is the mean correctness of the model each prompt went to. Tied scores
//!   are sent together (quality is interpolated across a tie, the expectation of a random
//!   tie-break), so a constant score is exactly the random router's diagonal.
//! - **PGR** = (quality − weak) / (strong − weak); **APGR** = the area under PGR against the
//!   fraction escalated (trapezoids over every `k`). A random router scores 0.5 on average.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ClassifierError, Result};

/// The cheap model's correctness column.
pub const WEAK_COLUMN: &str = "mistralai/Mixtral-8x7B-Instruct-v0.1";
/// The frontier model's correctness column.
pub const STRONG_COLUMN: &str = "gpt-4-1106-preview";

/// Which side of the fixed split a prompt is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Fit and tune here.
    Train,
    /// Report here.
    Test,
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            o => Err(format!("split must be `train` or `test`, not `{o}`")),
        }
    }
}

/// `sha256(prompt)[0] < 0x33` → test, else train.
pub fn split_of(prompt: &str) -> Split {
    if Sha256::digest(prompt.as_bytes())[0] < 0x33 {
        Split::Test
    } else {
        Split::Train
    }
}

/// One prompt and whether each model answered it correctly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The prompt as the models saw it.
    pub prompt: String,
    /// The cheap (local) model was right.
    pub weak: bool,
    /// The frontier model was right.
    pub strong: bool,
    /// MMLU subject, or the benchmark name for GSM8K.
    pub subject: String,
}

impl Sample {
    /// The difficulty label: only the frontier model was right.
    pub fn only_strong(&self) -> bool {
        self.strong && !self.weak
    }
}

/// One benchmark's samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Benchmark {
    /// `gsm8k` or `mmlu`.
    pub name: String,
    /// Every sample, in file order (MMLU subjects sorted by file name).
    pub samples: Vec<Sample>,
}

impl Benchmark {
    /// The samples on one side of the split.
    pub fn split(&self, split: Split) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| split_of(&s.prompt) == split)
            .collect()
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim() {
        "True" | "true" | "1" => Some(true),
        "False" | "false" | "0" => Some(false),
        _ => None,
    }
}

fn read_csv(path: &Path, subject: &str, out: &mut Vec<Sample>) -> Result<()> {
    let shown = path.display().to_string();
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(false)
        .from_path(path)
        .map_err(|e| ClassifierError::data(&shown, e.to_string()))?;
    let headers = rdr
        .headers()
        .map_err(|e| ClassifierError::data(&shown, e.to_string()))?
        .clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| ClassifierError::data(&shown, format!("no `{name}` column")))
    };
    let (p, w, s) = (col("prompt")?, col(WEAK_COLUMN)?, col(STRONG_COLUMN)?);
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(|e| ClassifierError::data(&shown, e.to_string()))?;
        let field = |c: usize| rec.get(c).unwrap_or("");
        let bad = |c: usize| {
            ClassifierError::data(
                &shown,
                format!("record {}: `{}` is not True/False", i + 1, field(c)),
            )
        };
        out.push(Sample {
            prompt: field(p).to_string(),
            weak: parse_bool(field(w)).ok_or_else(|| bad(w))?,
            strong: parse_bool(field(s)).ok_or_else(|| bad(s))?,
            subject: subject.to_string(),
        });
    }
    Ok(())
}

/// Reads `DIR/gsm8k_responses.csv` and `DIR/mmlu/mmlu_*.csv`; returns `[gsm8k, mmlu]`.
pub fn load(dir: &Path) -> Result<Vec<Benchmark>> {
    let mut gsm = Vec::new();
    read_csv(&dir.join("gsm8k_responses.csv"), "gsm8k", &mut gsm)?;
    let mmlu_dir = dir.join("mmlu");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&mmlu_dir)
        .map_err(|e| ClassifierError::io(&mmlu_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "csv"))
        .collect();
    files.sort();
    let mut mmlu = Vec::new();
    for f in &files {
        let subject = f
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("mmlu")
            .trim_start_matches("mmlu_")
            .to_string();
        read_csv(f, &subject, &mut mmlu)?;
    }
    if mmlu.is_empty() {
        return Err(ClassifierError::data(
            mmlu_dir.display(),
            "no mmlu_*.csv files",
        ));
    }
    Ok(vec![
        Benchmark {
            name: "gsm8k".into(),
            samples: gsm,
        },
        Benchmark {
            name: "mmlu".into(),
            samples: mmlu,
        },
    ])
}

/// One point of a quality-vs-escalation curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Fraction of prompts sent to the strong model.
    pub escalated: f64,
    /// Mean correctness of the model each prompt went to.
    pub quality: f64,
}

/// A router's curve and the numbers read off it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterEval {
    /// Area under PGR against the fraction escalated.
    pub apgr: f64,
    /// Least fraction escalated whose quality reaches 80% of the strong model's accuracy.
    pub escalated_for_80pct_quality: f64,
    /// Same for 95%.
    pub escalated_for_95pct_quality: f64,
    /// Least fraction escalated that recovers 80% of the weak→strong gap (RouteLLM's CPT(80%)).
    pub escalated_for_80pct_pgr: f64,
    /// Same for 95% of the gap.
    pub escalated_for_95pct_pgr: f64,
    /// The curve at every `k` (thinned to at most ~200 points for plotting).
    pub curve: Vec<CurvePoint>,
}

/// Weak and strong accuracy of a set of samples.
pub fn accuracies(samples: &[&Sample]) -> (f64, f64) {
    let n = samples.len().max(1) as f64;
    (
        samples.iter().filter(|s| s.weak).count() as f64 / n,
        samples.iter().filter(|s| s.strong).count() as f64 / n,
    )
}

/// The full curve (n+1 points, tie groups interpolated): higher score = escalate first.
pub fn quality_curve(scores: &[f64], samples: &[&Sample]) -> Vec<CurvePoint> {
    let n = samples.len();
    if n == 0 || scores.len() != n {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..n).collect();
    // NaN sorts last (never escalated first).
    order.sort_by(|&a, &b| {
        let (x, y) = (scores[a], scores[b]);
        match (x.is_nan(), y.is_nan()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            _ => y.total_cmp(&x),
        }
    });
    let nf = n as f64;
    let base: f64 = samples.iter().filter(|s| s.weak).count() as f64;
    // gain[i] = strong - weak for the i-th prompt in order.
    let mut points = Vec::with_capacity(n + 1);
    points.push(CurvePoint {
        escalated: 0.0,
        quality: base / nf,
    });
    let mut correct = base;
    let mut i = 0;
    while i < n {
        let mut j = i + 1;
        let same = |a: f64, b: f64| a == b || (a.is_nan() && b.is_nan());
        while j < n && same(scores[order[j]], scores[order[i]]) {
            j += 1;
        }
        let group_gain: f64 = order[i..j]
            .iter()
            .map(|&k| samples[k].strong as i32 as f64 - samples[k].weak as i32 as f64)
            .sum();
        let len = (j - i) as f64;
        for step in 1..=(j - i) {
            let q = correct + group_gain * step as f64 / len;
            points.push(CurvePoint {
                escalated: (i + step) as f64 / nf,
                quality: q / nf,
            });
        }
        correct += group_gain;
        i = j;
    }
    points
}

fn first_reaching(curve: &[CurvePoint], target: f64) -> f64 {
    curve
        .iter()
        .find(|p| p.quality >= target - 1e-12)
        .map_or(1.0, |p| p.escalated)
}

/// Evaluates a router's scores on `samples` (higher = more in need of the strong model).
pub fn evaluate(scores: &[f64], samples: &[&Sample]) -> RouterEval {
    let curve = quality_curve(scores, samples);
    let (weak, strong) = accuracies(samples);
    let gap = strong - weak;
    let pgr = |q: f64| {
        if gap.abs() < 1e-12 {
            0.0
        } else {
            (q - weak) / gap
        }
    };
    let mut apgr = 0.0;
    for w in curve.windows(2) {
        apgr += (w[1].escalated - w[0].escalated) * (pgr(w[0].quality) + pgr(w[1].quality)) / 2.0;
    }
    let step = (curve.len() / 200).max(1);
    let thin: Vec<CurvePoint> = curve
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0 || *i + 1 == curve.len())
        .map(|(_, p)| *p)
        .collect();
    RouterEval {
        apgr,
        escalated_for_80pct_quality: first_reaching(&curve, 0.80 * strong),
        escalated_for_95pct_quality: first_reaching(&curve, 0.95 * strong),
        escalated_for_80pct_pgr: first_reaching(&curve, weak + 0.80 * gap),
        escalated_for_95pct_pgr: first_reaching(&curve, weak + 0.95 * gap),
        curve: thin,
    }
}

/// The prompt-length baseline's score: longer prompts escalate first.
pub fn length_score(prompt: &str) -> f64 {
    prompt.chars().count() as f64
}

/// A random router's scores (a seeded permutation, so runs repeat).
pub fn random_scores(n: usize, seed: u64) -> Vec<f64> {
    let mut v: Vec<f64> = (0..n).map(|i| i as f64).collect();
    v.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(weak: bool, strong: bool) -> Sample {
        Sample {
            prompt: String::new(),
            weak,
            strong,
            subject: "t".into(),
        }
    }

    #[test]
    fn split_follows_the_readme_rule() {
        // sha256("") = e3b0… → train; find one test prompt by brute force.
        assert_eq!(split_of(""), Split::Train);
        let t = (0..1000)
            .map(|i| format!("p{i}"))
            .find(|p| Sha256::digest(p.as_bytes())[0] < 0x33)
            .unwrap();
        assert_eq!(split_of(&t), Split::Test);
        assert_eq!("test".parse::<Split>().unwrap(), Split::Test);
        assert!("dev".parse::<Split>().is_err());
    }

    #[test]
    fn oracle_random_and_inverse_routers() {
        // 4 prompts: two only-strong, one both, one neither.
        let data = [
            s(false, true),
            s(true, true),
            s(false, false),
            s(false, true),
        ];
        let refs: Vec<&Sample> = data.iter().collect();
        let oracle = [1.0, 0.0, 0.0, 1.0];
        let e = evaluate(&oracle, &refs);
        // Oracle: PGR reaches 1 at 50% escalated and stays: area = 0.5*0.5 + 0.5 = 0.75.
        assert!((e.apgr - 0.75).abs() < 1e-9, "{}", e.apgr);
        assert!((e.escalated_for_95pct_pgr - 0.5).abs() < 1e-9);
        let flat = evaluate(&[0.3; 4], &refs);
        assert!(
            (flat.apgr - 0.5).abs() < 1e-9,
            "a constant score is the diagonal"
        );
        let inverse = evaluate(&[0.0, 1.0, 1.0, 0.0], &refs);
        assert!(inverse.apgr < 0.5);
        assert_eq!(e.curve.first().unwrap().escalated, 0.0);
        assert_eq!(e.curve.last().unwrap().escalated, 1.0);
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        assert!(quality_curve(&[], &[]).is_empty());
        let data = [s(true, true)];
        let refs: Vec<&Sample> = data.iter().collect();
        let e = evaluate(&[f64::NAN], &refs);
        assert_eq!(e.apgr, 0.0);
        assert_eq!(random_scores(5, 1).len(), 5);
    }
}
