//! Routing evaluation on RouteLLM (`switchyard route-eval --routellm`): the difficulty model
//! against a random router and a prompt-length router, per benchmark, on one side of the
//! fixed split; a JSON summary and an SVG of quality against the fraction escalated.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::cache::embed_cached;
use crate::difficulty::{DifficultyModel, FitInfo};
use crate::embed::Embedder;
use crate::error::{ClassifierError, Result};
use crate::routellm::{self, accuracies, evaluate, CurvePoint, RouterEval, Sample, Split};

/// Random permutations averaged for the random router.
pub const RANDOM_SEEDS: u64 = 20;

/// Router names as they appear in the summary and the plot.
pub const ROUTER: &str = "switchyard";
/// The kNN half alone.
pub const ROUTER_KNN: &str = "switchyard_knn_only";
/// The logistic half alone.
pub const ROUTER_LOGISTIC: &str = "switchyard_logistic_only";
/// Prompt length.
pub const LENGTH: &str = "prompt_length";
/// Random.
pub const RANDOM: &str = "random";

/// One benchmark's results.
#[derive(Debug, Clone, Serialize)]
pub struct BenchmarkEval {
    /// Prompts evaluated.
    pub n: usize,
    /// The cheap model's accuracy on them.
    pub weak_accuracy: f64,
    /// The frontier model's accuracy on them.
    pub strong_accuracy: f64,
    /// Router name → its evaluation.
    pub routers: BTreeMap<String, RouterEval>,
}

/// What `route-eval --routellm` writes to `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RouteLlmSummary {
    /// `train` or `test`.
    pub split: Split,
    /// How each part of the difficulty artifact was fitted.
    pub fit: BTreeMap<String, FitInfo>,
    /// Benchmark → router → APGR (the headline numbers).
    pub apgr: BTreeMap<String, BTreeMap<String, f64>>,
    /// Benchmark → router → fraction escalated to reach 80% / 95% of the gap (CPT) and of the
    /// strong model's quality.
    pub escalation_needed: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    /// Full results, curves included.
    pub benchmarks: BTreeMap<String, BenchmarkEval>,
}

fn mean_eval(evals: &[RouterEval]) -> RouterEval {
    let n = evals.len().max(1) as f64;
    let avg = |f: &dyn Fn(&RouterEval) -> f64| evals.iter().map(f).sum::<f64>() / n;
    let len = evals.first().map_or(0, |e| e.curve.len());
    let curve = (0..len)
        .map(|i| CurvePoint {
            escalated: avg(&|e| e.curve.get(i).map_or(0.0, |p| p.escalated)),
            quality: avg(&|e| e.curve.get(i).map_or(0.0, |p| p.quality)),
        })
        .collect();
    RouterEval {
        apgr: avg(&|e| e.apgr),
        escalated_for_80pct_quality: avg(&|e| e.escalated_for_80pct_quality),
        escalated_for_95pct_quality: avg(&|e| e.escalated_for_95pct_quality),
        escalated_for_80pct_pgr: avg(&|e| e.escalated_for_80pct_pgr),
        escalated_for_95pct_pgr: avg(&|e| e.escalated_for_95pct_pgr),
        curve,
    }
}

/// Scores every prompt of `split` with `model` (embeddings through `cache` when given) and
/// evaluates it beside the baselines.
pub fn evaluate_routellm(
    data_dir: &Path,
    split: Split,
    embedder: &Embedder,
    model: &DifficultyModel,
    cache: Option<&Path>,
    mut progress: impl FnMut(usize, usize),
) -> Result<RouteLlmSummary> {
    let benches = routellm::load(data_dir)?;
    let mut out = RouteLlmSummary {
        split,
        fit: model.info(),
        apgr: BTreeMap::new(),
        escalation_needed: BTreeMap::new(),
        benchmarks: BTreeMap::new(),
    };
    for b in &benches {
        let samples: Vec<&Sample> = b.split(split);
        if samples.is_empty() {
            continue;
        }
        let texts: Vec<&str> = samples.iter().map(|s| s.prompt.as_str()).collect();
        let embs = match cache {
            Some(c) => embed_cached(embedder, &texts, c, &mut progress)?,
            None => embedder.embed_batch(&texts)?,
        };
        let mut blend = Vec::with_capacity(samples.len());
        let mut knn = Vec::with_capacity(samples.len());
        let mut lr = Vec::with_capacity(samples.len());
        for (e, s) in embs.iter().zip(&samples) {
            let sc = model.score(e, s.prompt.chars().count())?;
            blend.push(sc.probability);
            knn.push(sc.knn);
            lr.push(sc.logistic);
        }
        let lengths: Vec<f64> = samples
            .iter()
            .map(|s| routellm::length_score(&s.prompt))
            .collect();
        let randoms: Vec<RouterEval> = (0..RANDOM_SEEDS)
            .map(|seed| evaluate(&routellm::random_scores(samples.len(), seed), &samples))
            .collect();
        let mut routers = BTreeMap::new();
        routers.insert(ROUTER.to_string(), evaluate(&blend, &samples));
        routers.insert(ROUTER_KNN.to_string(), evaluate(&knn, &samples));
        routers.insert(ROUTER_LOGISTIC.to_string(), evaluate(&lr, &samples));
        routers.insert(LENGTH.to_string(), evaluate(&lengths, &samples));
        routers.insert(RANDOM.to_string(), mean_eval(&randoms));
        let (weak, strong) = accuracies(&samples);
        out.apgr.insert(
            b.name.clone(),
            routers.iter().map(|(k, v)| (k.clone(), v.apgr)).collect(),
        );
        out.escalation_needed.insert(
            b.name.clone(),
            routers
                .iter()
                .map(|(k, v)| {
                    let m: BTreeMap<String, f64> = [
                        ("pgr_80pct", v.escalated_for_80pct_pgr),
                        ("pgr_95pct", v.escalated_for_95pct_pgr),
                        ("quality_80pct", v.escalated_for_80pct_quality),
                        ("quality_95pct", v.escalated_for_95pct_quality),
                    ]
                    .into_iter()
                    .map(|(a, b)| (a.to_string(), b))
                    .collect();
                    (k.clone(), m)
                })
                .collect(),
        );
        out.benchmarks.insert(
            b.name.clone(),
            BenchmarkEval {
                n: samples.len(),
                weak_accuracy: weak,
                strong_accuracy: strong,
                routers,
            },
        );
    }
    Ok(out)
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> ClassifierError {
    ClassifierError::data(path.display(), format!("plotting: {e}"))
}

/// Writes `frontier.svg`: one panel per benchmark, quality against the fraction escalated,
/// one line per router (APGR in the legend), the weak and strong accuracies as dashed lines.
pub fn write_frontier_svg(summary: &RouteLlmSummary, path: &Path) -> Result<()> {
    let panels = summary.benchmarks.len().max(1);
    let root = SVGBackend::new(path, (620 * panels as u32, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let areas = root.split_evenly((1, panels));
    let style: [(&str, &str, RGBColor, u32); 4] = [
        (
            ROUTER,
            "switchyard (MiniLM kNN + logistic)",
            RGBColor(0xd6, 0x27, 0x28),
            3,
        ),
        (LENGTH, "prompt length", RGBColor(0x1f, 0x77, 0xb4), 2),
        (ROUTER_KNN, "kNN only", RGBColor(0xff, 0x9f, 0x40), 1),
        (RANDOM, "random", RGBColor(0x7f, 0x7f, 0x7f), 2),
    ];
    for (area, (name, b)) in areas.iter().zip(&summary.benchmarks) {
        let lo = b
            .routers
            .values()
            .flat_map(|r| r.curve.iter().map(|p| p.quality))
            .fold(b.weak_accuracy, f64::min);
        let hi = b
            .routers
            .values()
            .flat_map(|r| r.curve.iter().map(|p| p.quality))
            .fold(b.strong_accuracy, f64::max);
        let pad = (hi - lo).max(0.01) * 0.08;
        let split = match summary.split {
            Split::Train => "train",
            Split::Test => "test",
        };
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{} ({} split, n = {})", name.to_uppercase(), split, b.n),
                ("sans-serif", 22),
            )
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..1.0, (lo - pad)..(hi + pad))
            .map_err(|e| plot_err(path, e))?;
        chart
            .configure_mesh()
            .x_desc("fraction of prompts escalated to the frontier model")
            .y_desc("accuracy of the routed answers")
            .x_label_formatter(&|x| format!("{:.0}%", x * 100.0))
            .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .draw()
            .map_err(|e| plot_err(path, e))?;
        for (acc, label) in [
            (b.weak_accuracy, "local (Mixtral-8x7B) alone"),
            (b.strong_accuracy, "frontier (GPT-4) alone"),
        ] {
            let grey = RGBColor(0x99, 0x99, 0x99);
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(0.0, acc), (1.0, acc)],
                    6,
                    4,
                    grey.stroke_width(1),
                ))
                .map_err(|e| plot_err(path, e))?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{label} {:.1}%", acc * 100.0),
                    (0.02, acc + pad * 0.25),
                    ("sans-serif", 13).into_font().color(&grey),
                )))
                .map_err(|e| plot_err(path, e))?;
        }
        for (key, label, color, width) in style {
            let Some(r) = b.routers.get(key) else {
                continue;
            };
            let pts: Vec<(f64, f64)> = r.curve.iter().map(|p| (p.escalated, p.quality)).collect();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(width)))
                .map_err(|e| plot_err(path, e))?
                .label(format!("{label}: APGR {:.3}", r.apgr))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(3))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(0xcc, 0xcc, 0xcc))
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| plot_err(path, e))?;
    }
    root.present().map_err(|e| plot_err(path, e))?;
    Ok(())
}

/// Writes `dir/summary.json` and `dir/frontier.svg`.
pub fn write_outputs(summary: &RouteLlmSummary, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ClassifierError::io(dir, e))?;
    let json = serde_json::to_string_pretty(summary)
        .map_err(|e| ClassifierError::data(dir.display(), e.to_string()))?;
    let p = dir.join("summary.json");
    std::fs::write(&p, json + "\n").map_err(|e| ClassifierError::io(&p, e))?;
    write_frontier_svg(summary, &dir.join("frontier.svg"))
}
