//! The difficulty score: P(the cheap tier fails and the frontier tier succeeds) for a prompt.
//!
//! Two estimators over the MiniLM embedding, blended:
//! - **kNN**: the share of the `k` most similar train prompts (cosine) on which only the strong
//!   model was right. The neighbour memory is stored compactly: embeddings centred and
//!   projected on their top principal components (PCA), renormalised, kept as f16.
//! - **logistic head** on the full embedding plus the standardised `ln(1 + chars)`,
//!   L2-regularised, fitted by Newton's method.
//!
//! `p = α·knn + (1 − α)·logistic`. `k`, the L2 strength and `α` are chosen on the train split
//! alone: leave-one-out kNN scores and 5-fold out-of-fold logistic scores, maximising the mean
//! per-benchmark APGR. Each benchmark family is fitted separately (a joint fit let MMLU's 11K
//! prompts set the PCA basis and the head, and GSM8K fell to 0.60 test APGR); a prompt is
//! scored by the part whose gate (one-vs-rest logistic regression on the full embedding,
//! [`DifficultyModel::fit_gates`]) scores highest, or, in an artifact without gates, whose
//! anchor train prompts are nearest ([`DifficultyModel`]).
//!
//! [`DifficultyPart::percentile`] maps `p` onto its rank among the train prompts' out-of-fold
//! scores, so a policy threshold reads as "escalate the hardest X%".
//!
//! The artifact is one safetensors file (`models/router/difficulty.safetensors`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use half::f16;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::{ClassifierError, Result};
use crate::linalg::{cholesky_solve, symmetric_eigen};
use crate::routellm::{evaluate, Sample};

/// How the artifact was fitted; stored in its metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitInfo {
    /// Neighbours voting.
    pub k: usize,
    /// PCA width of the neighbour memory (0 = the full embedding).
    pub pca_dim: usize,
    /// Weight of the kNN score in the blend.
    pub alpha: f64,
    /// L2 strength of the logistic head.
    pub l2: f64,
    /// Train prompts per benchmark.
    pub train_counts: BTreeMap<String, usize>,
    /// Train-split APGR per benchmark of the chosen blend (out-of-fold scores).
    pub train_cv_apgr: BTreeMap<String, f64>,
    /// What the label is and where the data came from.
    pub label: String,
}

/// A fitted difficulty model.
#[derive(Debug, Clone)]
pub struct DifficultyPart {
    dim: usize,
    mean: Vec<f32>,
    /// `[r, dim]` rows; empty when the memory keeps full embeddings.
    components: Vec<f32>,
    r: usize,
    /// `[m, key_dim]` unit rows.
    keys: Vec<f32>,
    labels: Vec<f32>,
    k: usize,
    w: Vec<f32>,
    w_len: f32,
    bias: f32,
    len_mean: f32,
    len_std: f32,
    alpha: f32,
    /// 101 quantiles of the train out-of-fold blended scores.
    quantiles: Vec<f32>,
    /// `[a, dim]` unit train embeddings (full width) that say which part a prompt belongs to.
    anchors: Vec<f32>,
    /// `[dim + 1]` one-vs-rest logistic gate (weights, bias) saying "this prompt belongs to this
    /// part"; empty when not fitted (then the anchors choose).
    gate: Vec<f32>,
    info: FitInfo,
}

/// Train embeddings kept per part, at full width, to choose a prompt's part: up to 2048 spread over
/// the train set (1.5 MB in f16 for MMLU; 256 sent 7% of MMLU-test APGR astray).
pub const ANCHORS: usize = 2048;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn log_len(chars: usize) -> f64 {
    (1.0 + chars as f64).ln()
}

fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

impl DifficultyPart {
    /// Embedding width the model expects.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// How it was fitted.
    pub fn info(&self) -> &FitInfo {
        &self.info
    }

    /// Neighbour-memory size (train prompts).
    pub fn memory_len(&self) -> usize {
        self.labels.len()
    }

    fn key_dim(&self) -> usize {
        if self.r > 0 {
            self.r
        } else {
            self.dim
        }
    }

    fn project(&self, emb: &[f32]) -> Vec<f32> {
        let mut out = if self.r == 0 {
            emb.to_vec()
        } else {
            let c: Vec<f32> = emb.iter().zip(&self.mean).map(|(x, m)| x - m).collect();
            self.components
                .chunks_exact(self.dim)
                .map(|row| row.iter().zip(&c).map(|(a, b)| a * b).sum())
                .collect()
        };
        normalize(&mut out);
        out
    }

    fn check(&self, emb: &[f32]) -> Result<()> {
        if emb.len() != self.dim {
            return Err(ClassifierError::Input(format!(
                "embedding has {} dimensions, the difficulty model wants {}",
                emb.len(),
                self.dim
            )));
        }
        if emb.iter().any(|x| !x.is_finite()) {
            return Err(ClassifierError::Input("embedding is not finite".into()));
        }
        Ok(())
    }

    /// The kNN estimate: share of the `k` nearest train prompts only the strong model got right.
    pub fn knn(&self, emb: &[f32]) -> Result<f64> {
        Ok(self.knn_with_similarity(emb)?.0)
    }

    /// [`knn`](Self::knn) and the mean cosine of those neighbours (how close the prompt is to
    /// this part's train prompts).
    pub fn knn_with_similarity(&self, emb: &[f32]) -> Result<(f64, f64)> {
        self.check(emb)?;
        let q = self.project(emb);
        let kd = self.key_dim();
        let mut sims: Vec<(f32, f32)> = self
            .keys
            .chunks_exact(kd)
            .zip(&self.labels)
            .map(|(key, &l)| (key.iter().zip(&q).map(|(a, b)| a * b).sum(), l))
            .collect();
        let k = self.k.min(sims.len()).max(1);
        if sims.is_empty() {
            return Ok((0.0, -1.0));
        }
        if k < sims.len() {
            sims.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        }
        let top = &sims[..k];
        Ok((
            top.iter().map(|s| s.1 as f64).sum::<f64>() / k as f64,
            top.iter().map(|s| s.0 as f64).sum::<f64>() / k as f64,
        ))
    }

    /// How much a prompt looks like this part's train prompts: mean cosine of its 3 nearest
    /// anchors (full-width embeddings, comparable across parts).
    pub fn affinity(&self, emb: &[f32]) -> Result<f64> {
        self.check(emb)?;
        let mut sims: Vec<f32> = self
            .anchors
            .chunks_exact(self.dim)
            .map(|a| crate::embed::dot(a, emb))
            .collect();
        sims.sort_by(|a, b| b.total_cmp(a));
        let k = sims.len().min(3);
        if k == 0 {
            return Ok(crate::embed::cosine(emb, &self.mean) as f64);
        }
        Ok(sims[..k].iter().map(|s| *s as f64).sum::<f64>() / k as f64)
    }

    /// The gate's logit for this part (`None` when the part has no gate).
    pub fn gate_logit(&self, emb: &[f32]) -> Option<f64> {
        if self.gate.len() != self.dim + 1 {
            return None;
        }
        Some(
            emb.iter()
                .zip(&self.gate)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                + self.gate[self.dim] as f64,
        )
    }

    /// The logistic head's probability.
    pub fn logistic(&self, emb: &[f32], chars: usize) -> Result<f64> {
        self.check(emb)?;
        let z = (log_len(chars) - self.len_mean as f64) / self.len_std as f64;
        let s: f64 = emb
            .iter()
            .zip(&self.w)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum::<f64>()
            + self.w_len as f64 * z
            + self.bias as f64;
        Ok(sigmoid(s))
    }

    /// The blended probability that only the frontier tier answers correctly.
    pub fn probability(&self, emb: &[f32], chars: usize) -> Result<f64> {
        let a = self.alpha as f64;
        let knn = if a > 0.0 { self.knn(emb)? } else { 0.0 };
        let lr = if a < 1.0 {
            self.logistic(emb, chars)?
        } else {
            0.0
        };
        Ok(a * knn + (1.0 - a) * lr)
    }

    /// The rank of `p` among the train prompts' out-of-fold scores, in `0..=1`.
    pub fn percentile(&self, p: f64) -> f64 {
        let q = &self.quantiles;
        if q.len() < 2 || !p.is_finite() {
            return 0.0;
        }
        let p = p as f32;
        if p <= q[0] {
            return 0.0;
        }
        if p >= q[q.len() - 1] {
            return 1.0;
        }
        let i = q.partition_point(|&x| x <= p).max(1);
        let (lo, hi) = (q[i - 1], q[i]);
        let frac = if hi > lo { (p - lo) / (hi - lo) } else { 0.5 };
        ((i - 1) as f64 + frac as f64) / (q.len() - 1) as f64
    }

    /// This part's tensors (named under `prefix`) and metadata entries.
    #[allow(clippy::type_complexity)]
    fn to_tensors(
        &self,
        prefix: &str,
        meta: &mut HashMap<String, String>,
    ) -> Result<Vec<(String, Dtype, Vec<usize>, Vec<u8>)>> {
        let f32s = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let keys16: Vec<u8> = self
            .keys
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect();
        let head: Vec<f32> = vec![
            self.w_len,
            self.bias,
            self.len_mean,
            self.len_std,
            self.alpha,
        ];
        let bufs: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
            ("pca.mean", Dtype::F32, vec![self.dim], f32s(&self.mean)),
            (
                "pca.components",
                Dtype::F32,
                vec![self.r, self.dim],
                f32s(&self.components),
            ),
            (
                "knn.keys",
                Dtype::F16,
                vec![self.labels.len(), self.key_dim()],
                keys16,
            ),
            (
                "knn.labels",
                Dtype::F32,
                vec![self.labels.len()],
                f32s(&self.labels),
            ),
            ("logistic.w", Dtype::F32, vec![self.dim], f32s(&self.w)),
            ("head", Dtype::F32, vec![head.len()], f32s(&head)),
            (
                "quantiles",
                Dtype::F32,
                vec![self.quantiles.len()],
                f32s(&self.quantiles),
            ),
            (
                "anchors",
                Dtype::F16,
                vec![self.anchors.len() / self.dim.max(1), self.dim],
                self.anchors
                    .iter()
                    .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                    .collect(),
            ),
        ];
        let mut bufs = bufs;
        if !self.gate.is_empty() {
            bufs.push(("gate", Dtype::F32, vec![self.gate.len()], f32s(&self.gate)));
        }
        meta.insert(
            format!("{prefix}fit"),
            serde_json::to_string(&self.info)
                .map_err(|e| ClassifierError::data(prefix, e.to_string()))?,
        );
        meta.insert(format!("{prefix}k"), self.k.to_string());
        Ok(bufs
            .into_iter()
            .map(|(n, d, sh, b)| (format!("{prefix}{n}"), d, sh, b))
            .collect())
    }

    fn from_st(
        st: &safetensors::SafeTensors<'_>,
        meta: &HashMap<String, String>,
        prefix: &str,
        origin: &str,
    ) -> Result<Self> {
        let bad = |m: String| ClassifierError::data(origin, format!("part `{prefix}`: {m}"));
        let info: FitInfo =
            serde_json::from_str(meta.get(&format!("{prefix}fit")).map_or("", String::as_str))
                .map_err(|e| bad(format!("fit metadata: {e}")))?;
        let k: usize = meta
            .get(&format!("{prefix}k"))
            .and_then(|k| k.parse().ok())
            .ok_or_else(|| bad("k metadata missing".into()))?;
        let get = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            let t = st
                .tensor(&format!("{prefix}{name}"))
                .map_err(|e| bad(format!("{name}: {e}")))?;
            let v = match t.dtype() {
                Dtype::F32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::F16 => t
                    .data()
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                d => return Err(bad(format!("{name}: dtype {d:?}"))),
            };
            Ok((t.shape().to_vec(), v))
        };
        let (ms, mean) = get("pca.mean")?;
        let dim = *ms
            .first()
            .ok_or_else(|| bad("pca.mean has no shape".into()))?;
        let (cs, components) = get("pca.components")?;
        let r = cs.first().copied().unwrap_or(0);
        let (ks, keys) = get("knn.keys")?;
        let (_, labels) = get("knn.labels")?;
        let (_, w) = get("logistic.w")?;
        let (_, head) = get("head")?;
        let (_, quantiles) = get("quantiles")?;
        let (_, anchors) = get("anchors")?;
        let gate = if st.tensor(&format!("{prefix}gate")).is_ok() {
            get("gate")?.1
        } else {
            Vec::new()
        };
        let key_dim = if r > 0 { r } else { dim };
        let ok = mean.len() == dim
            && components.len() == r * dim
            && ks.len() == 2
            && ks[1] == key_dim
            && keys.len() == labels.len() * key_dim
            && w.len() == dim
            && head.len() == 5
            && anchors.len() % dim.max(1) == 0
            && (gate.is_empty() || gate.len() == dim + 1)
            && k > 0;
        if !ok {
            return Err(bad("inconsistent tensor shapes".into()));
        }
        let all_finite = [
            &mean,
            &components,
            &keys,
            &labels,
            &w,
            &head,
            &quantiles,
            &anchors,
            &gate,
        ]
        .iter()
        .all(|v| v.iter().all(|x| x.is_finite()));
        if !all_finite || head[3] <= 0.0 {
            return Err(bad("non-finite or invalid parameters".into()));
        }
        Ok(Self {
            dim,
            mean,
            components,
            r,
            keys,
            labels,
            k,
            w,
            w_len: head[0],
            bias: head[1],
            len_mean: head[2],
            len_std: head[3],
            alpha: head[4],
            quantiles,
            anchors,
            gate,
            info,
        })
    }
}

/// The artifact format tag (safetensors metadata `format`).
pub const FORMAT: &str = "switchyard-difficulty-v2";

/// What the model says about one prompt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DifficultyScore {
    /// The part (benchmark family) the prompt is nearest to.
    pub part: String,
    /// Estimated P(only the frontier tier is right).
    pub probability: f64,
    /// Its rank among that part's train prompts, `0..=1`.
    pub percentile: f64,
    /// The kNN half.
    pub knn: f64,
    /// The logistic half.
    pub logistic: f64,
}

/// The difficulty model: one [`DifficultyPart`] per benchmark family (fitted separately,
/// because what makes a math word problem hard is not what makes a multiple-choice question
/// hard); a prompt is scored by the part whose anchors (sampled train prompts) are nearest.
#[derive(Debug, Clone)]
pub struct DifficultyModel {
    parts: Vec<(String, DifficultyPart)>,
}

impl DifficultyModel {
    /// Assembles fitted parts (at least one, all of one embedding width).
    pub fn new(parts: Vec<(String, DifficultyPart)>) -> Result<Self> {
        let Some(dim) = parts.first().map(|p| p.1.dim()) else {
            return Err(ClassifierError::Input(
                "a difficulty model needs a part".into(),
            ));
        };
        if parts
            .iter()
            .any(|p| p.1.dim() != dim || p.0.is_empty() || p.0.contains('.'))
        {
            return Err(ClassifierError::Input(
                "parts differ in width or have empty or dotted names".into(),
            ));
        }
        Ok(Self { parts })
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.parts[0].1.dim()
    }

    /// The parts.
    pub fn parts(&self) -> &[(String, DifficultyPart)] {
        &self.parts
    }

    /// Part name → how it was fitted.
    pub fn info(&self) -> BTreeMap<String, FitInfo> {
        self.parts
            .iter()
            .map(|(n, p)| (n.clone(), p.info().clone()))
            .collect()
    }

    /// Scores a unit embedding of a prompt of `chars` characters.
    pub fn score(&self, emb: &[f32], chars: usize) -> Result<DifficultyScore> {
        // Similarities in different parts' PCA spaces are not comparable, so the part is
        // chosen in the full embedding space, by its nearest anchors (a centroid alone sends
        // MMLU arithmetic questions to the GSM8K part).
        // A fitted gate (linear, one-vs-rest on the full embedding) is preferred: 2048 anchors
        // sent 4% of MMLU-test prompts to the GSM8K part, the gate 0.07%.
        let gated = self.parts.iter().all(|p| p.1.gate.len() == p.1.dim + 1);
        let mut best: Option<(f64, &String, &DifficultyPart)> = None;
        for (name, part) in &self.parts {
            let sim = if gated {
                part.check(emb)?;
                part.gate_logit(emb).unwrap_or(f64::NEG_INFINITY)
            } else {
                part.affinity(emb)?
            };
            if best.as_ref().is_none_or(|b| sim > b.0) {
                best = Some((sim, name, part));
            }
        }
        let (_, name, part) = best.ok_or_else(|| ClassifierError::Input("no parts".into()))?;
        let knn = part.knn(emb)?;
        let logistic = part.logistic(emb, chars)?;
        let a = part.alpha as f64;
        let probability = a * knn + (1.0 - a) * logistic;
        Ok(DifficultyScore {
            part: name.clone(),
            probability,
            percentile: part.percentile(probability),
            knn,
            logistic,
        })
    }

    /// Fits each part's gate: one-vs-rest L2 logistic regression on the full embedding, on
    /// train embeddings `embs` whose part index (into [`parts`](Self::parts)) is `part_of`.
    pub fn fit_gates(&mut self, embs: &[Vec<f32>], part_of: &[usize], l2: f64) -> Result<()> {
        let dim = self.dim();
        if embs.len() != part_of.len() || embs.iter().any(|e| e.len() != dim) {
            return Err(ClassifierError::Input(
                "fit_gates needs one embedding of the model's width per part index".into(),
            ));
        }
        // Rows `[emb, 0]`: fit_logistic's last feature (prompt length) is unused here.
        let x: Vec<f32> = embs
            .iter()
            .flat_map(|e| e.iter().copied().chain(std::iter::once(0.0)))
            .collect();
        for (pi, (_, part)) in self.parts.iter_mut().enumerate() {
            let y: Vec<f32> = part_of.iter().map(|&p| (p == pi) as u8 as f32).collect();
            let m = fit_logistic(&x, dim + 1, &y, l2)?;
            part.gate =
                m.w.iter()
                    .map(|v| *v as f32)
                    .chain(std::iter::once(m.bias as f32))
                    .collect();
            // The gate decides the part from now on; the anchors would only add megabytes.
            part.anchors.clear();
        }
        Ok(())
    }

    /// Writes the artifact: every part's tensors under `<part>.`, f16 neighbour keys.
    pub fn save(&self, path: &Path) -> Result<()> {
        let shown = path.display().to_string();
        let mut meta = HashMap::new();
        let mut bufs = Vec::new();
        for (name, part) in &self.parts {
            bufs.extend(part.to_tensors(&format!("{name}."), &mut meta)?);
        }
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert(
            "parts".to_string(),
            self.parts
                .iter()
                .map(|p| p.0.as_str())
                .collect::<Vec<_>>()
                .join(","),
        );
        let bad = |e: safetensors::SafeTensorError| ClassifierError::data(&shown, e.to_string());
        let mut views = Vec::new();
        for (name, dt, shape, data) in &bufs {
            views.push((
                name.as_str(),
                TensorView::new(*dt, shape.clone(), data).map_err(bad)?,
            ));
        }
        let bytes = safetensors::serialize(views, Some(meta)).map_err(bad)?;
        std::fs::write(path, bytes).map_err(|e| ClassifierError::io(path, e))
    }

    /// Reads an artifact written by [`save`](Self::save).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| ClassifierError::io(path, e))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Parses an artifact from memory; `origin` names it in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let bad = |m: String| ClassifierError::data(origin, m);
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!(
                "not a switchyard difficulty artifact (format metadata is not {FORMAT})"
            )));
        }
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let names = meta.get("parts").cloned().unwrap_or_default();
        let parts = names
            .split(',')
            .filter(|n| !n.is_empty())
            .map(|n| {
                Ok((
                    n.to_string(),
                    DifficultyPart::from_st(&st, &meta, &format!("{n}."), origin)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Self::new(parts).map_err(|e| bad(e.to_string()))
    }
}

/// Hyper-parameter grid and memory form for [`fit`].
#[derive(Debug, Clone)]
pub struct FitConfig {
    /// Candidate neighbour counts.
    pub ks: Vec<usize>,
    /// Candidate L2 strengths of the logistic head.
    pub l2s: Vec<f64>,
    /// Candidate kNN weights in the blend.
    pub alphas: Vec<f64>,
    /// PCA width of the stored memory (0 = full embeddings).
    pub pca_dim: usize,
    /// Folds for the out-of-fold logistic scores.
    pub folds: usize,
}

impl Default for FitConfig {
    fn default() -> Self {
        Self {
            ks: vec![16, 32, 48, 64, 96, 128],
            l2s: vec![4.0, 16.0, 64.0, 256.0, 1024.0],
            alphas: (0..=10).map(|i| i as f64 / 10.0).collect(),
            pca_dim: 64,
            folds: 5,
        }
    }
}

/// What fitting measured on the train split.
#[derive(Debug, Clone, Serialize)]
pub struct FitReport {
    /// Train APGR per benchmark of the chosen blend (out-of-fold).
    pub chosen: BTreeMap<String, f64>,
    /// `(k, l2, alpha)` → mean train APGR, for every grid point.
    pub grid: Vec<(usize, f64, f64, f64)>,
}

fn matmul_t(a: &[f32], n: usize, d: usize, b: &[f32], m: usize) -> Result<Vec<f32>> {
    let dev = Device::Cpu;
    let ta = Tensor::from_slice(a, (n, d), &dev)?;
    let tb = Tensor::from_slice(b, (m, d), &dev)?;
    Ok(ta.matmul(&tb.t()?)?.flatten_all()?.to_vec1::<f32>()?)
}

/// For every row of `keys` (`[m, d]`), the labels of its `max_k` nearest other rows, nearest
/// first.
fn loo_neighbour_labels(
    keys: &[f32],
    d: usize,
    labels: &[f32],
    max_k: usize,
) -> Result<Vec<Vec<f32>>> {
    let m = labels.len();
    let mut out = Vec::with_capacity(m);
    let block = 512;
    for start in (0..m).step_by(block) {
        let end = (start + block).min(m);
        let sims = matmul_t(&keys[start * d..end * d], end - start, d, keys, m)?;
        for (r, row) in sims.chunks_exact(m).enumerate() {
            let me = start + r;
            let mut idx: Vec<(f32, usize)> = row
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != me)
                .map(|(j, s)| (*s, j))
                .collect();
            let k = max_k.min(idx.len());
            if k == 0 {
                out.push(Vec::new());
                continue;
            }
            idx.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            idx.truncate(k);
            idx.sort_by(|a, b| b.0.total_cmp(&a.0));
            out.push(idx.iter().map(|(_, j)| labels[*j]).collect());
        }
    }
    Ok(out)
}

struct Logistic {
    w: Vec<f64>,
    w_len: f64,
    bias: f64,
}

/// Newton's method for L2-regularised logistic regression on rows `[emb, z_len]`.
fn fit_logistic(x: &[f32], d: usize, y: &[f32], l2: f64) -> Result<Logistic> {
    let n = y.len();
    let p = d + 1; // features + intercept (last)
    let mut beta = vec![0.0f64; p];
    let base = (y.iter().map(|v| *v as f64).sum::<f64>() / n.max(1) as f64).clamp(1e-3, 1.0 - 1e-3);
    beta[d] = (base / (1.0 - base)).ln();
    for _iter in 0..25 {
        let mut probs = vec![0.0f64; n];
        let mut grad = vec![0.0f64; p];
        let mut xs = vec![0.0f32; n * p];
        for i in 0..n {
            let row = &x[i * d..(i + 1) * d];
            let s: f64 = row
                .iter()
                .zip(&beta)
                .map(|(a, b)| *a as f64 * b)
                .sum::<f64>()
                + beta[d];
            let pi = sigmoid(s);
            probs[i] = pi;
            let r = pi - y[i] as f64;
            for (g, a) in grad.iter_mut().zip(row) {
                *g += r * *a as f64;
            }
            grad[d] += r;
            let sw = (pi * (1.0 - pi)).max(1e-12).sqrt() as f32;
            for (j, a) in row.iter().enumerate() {
                xs[i * p + j] = a * sw;
            }
            xs[i * p + d] = sw;
        }
        for j in 0..d {
            grad[j] += l2 * beta[j];
        }
        let dev = Device::Cpu;
        let t = Tensor::from_slice(&xs, (n, p), &dev)?;
        let h32 = t.t()?.matmul(&t)?.flatten_all()?.to_vec1::<f32>()?;
        let mut h: Vec<f64> = h32.iter().map(|v| *v as f64).collect();
        for j in 0..d {
            h[j * p + j] += l2;
        }
        h[d * p + d] += 1e-6;
        let step = cholesky_solve(&h, &grad, p).ok_or_else(|| {
            ClassifierError::Input("logistic Hessian is not positive definite".into())
        })?;
        let mut max_step = 0.0f64;
        for (b, s) in beta.iter_mut().zip(&step) {
            *b -= s;
            max_step = max_step.max(s.abs());
        }
        if max_step < 1e-6 {
            break;
        }
    }
    Ok(Logistic {
        w: beta[..d - 1].to_vec(),
        w_len: beta[d - 1],
        bias: beta[d],
    })
}

fn logistic_score(m: &Logistic, row: &[f32]) -> f64 {
    let d = m.w.len();
    let s: f64 = row[..d]
        .iter()
        .zip(&m.w)
        .map(|(a, b)| *a as f64 * b)
        .sum::<f64>()
        + m.w_len * row[d] as f64
        + m.bias;
    sigmoid(s)
}

/// Fits the blend on train samples. `embs[i]` is the embedding of `samples[i]`, `bench[i]`
/// names its benchmark (the tuning objective averages APGR over benchmarks).
pub fn fit(
    embs: &[Vec<f32>],
    samples: &[&Sample],
    bench: &[&str],
    cfg: &FitConfig,
) -> Result<(DifficultyPart, FitReport)> {
    let n = samples.len();
    if n == 0 || embs.len() != n || bench.len() != n {
        return Err(ClassifierError::Input(
            "fit needs one embedding and benchmark per sample".into(),
        ));
    }
    let dim = embs[0].len();
    if embs.iter().any(|e| e.len() != dim) {
        return Err(ClassifierError::Input("embeddings differ in width".into()));
    }
    let labels: Vec<f32> = samples
        .iter()
        .map(|s| s.only_strong() as u8 as f32)
        .collect();

    // --- PCA memory
    let mean: Vec<f32> = (0..dim)
        .map(|j| embs.iter().map(|e| e[j] as f64).sum::<f64>() as f32 / n as f32)
        .collect();
    let r = if cfg.pca_dim > 0 && cfg.pca_dim < dim {
        cfg.pca_dim
    } else {
        0
    };
    let components: Vec<f32> = if r > 0 {
        let centred: Vec<f32> = embs
            .iter()
            .flat_map(|e| e.iter().zip(&mean).map(|(x, m)| x - m))
            .collect();
        let t = Tensor::from_slice(&centred, (n, dim), &Device::Cpu)?;
        let cov32 = t.t()?.matmul(&t)?.flatten_all()?.to_vec1::<f32>()?;
        let cov: Vec<f64> = cov32.iter().map(|v| *v as f64 / n as f64).collect();
        let (_, vecs) = symmetric_eigen(&cov, dim);
        vecs.iter()
            .take(r)
            .flat_map(|v| v.iter().map(|x| *x as f32))
            .collect()
    } else {
        Vec::new()
    };
    let mut model = DifficultyPart {
        dim,
        mean,
        components,
        r,
        keys: Vec::new(),
        labels: labels.clone(),
        k: 1,
        w: vec![0.0; dim],
        w_len: 0.0,
        bias: 0.0,
        len_mean: 0.0,
        len_std: 1.0,
        alpha: 1.0,
        quantiles: Vec::new(),
        anchors: (0..ANCHORS.min(n))
            .flat_map(|i| {
                embs[i * n / ANCHORS.min(n)]
                    .iter()
                    .map(|x| f16::from_f32(*x).to_f32())
            })
            .collect(),
        gate: Vec::new(),
        info: FitInfo {
            k: 0,
            pca_dim: r,
            alpha: 0.0,
            l2: 0.0,
            train_counts: BTreeMap::new(),
            train_cv_apgr: BTreeMap::new(),
            label: String::new(),
        },
    };
    // Keys are stored as f16; fit on the rounded values so tuning sees what inference sees.
    let keys: Vec<f32> = embs
        .iter()
        .flat_map(|e| model.project(e))
        .map(|x| f16::from_f32(x).to_f32())
        .collect();
    let kd = model.key_dim();
    let max_k = cfg.ks.iter().copied().max().unwrap_or(32).max(1);
    let neigh = loo_neighbour_labels(&keys, kd, &labels, max_k)?;
    model.keys = keys;

    // --- logistic features
    let lens: Vec<f64> = samples
        .iter()
        .map(|s| log_len(s.prompt.chars().count()))
        .collect();
    let len_mean = lens.iter().sum::<f64>() / n as f64;
    let len_std = (lens.iter().map(|l| (l - len_mean).powi(2)).sum::<f64>() / n as f64)
        .sqrt()
        .max(1e-6);
    let xd = dim + 1;
    let x: Vec<f32> = embs
        .iter()
        .zip(&lens)
        .flat_map(|(e, l)| {
            e.iter()
                .copied()
                .chain(std::iter::once(((l - len_mean) / len_std) as f32))
        })
        .collect();
    let folds = cfg.folds.max(2);
    // Fold by position in a seeded permutation, so folds mix subjects.
    let perm = crate::routellm::random_scores(n, 7);
    let fold_of: Vec<usize> = perm.iter().map(|p| *p as usize % folds).collect();
    let mut oof_by_l2: Vec<Vec<f64>> = Vec::new();
    for &l2 in &cfg.l2s {
        let mut oof = vec![0.0; n];
        for f in 0..folds {
            let tr: Vec<usize> = (0..n).filter(|i| fold_of[*i] != f).collect();
            let xt: Vec<f32> = tr
                .iter()
                .flat_map(|&i| x[i * xd..(i + 1) * xd].iter().copied())
                .collect();
            let yt: Vec<f32> = tr.iter().map(|&i| labels[i]).collect();
            let m = fit_logistic(&xt, xd, &yt, l2)?;
            for i in (0..n).filter(|i| fold_of[*i] == f) {
                oof[i] = logistic_score(&m, &x[i * xd..(i + 1) * xd]);
            }
        }
        oof_by_l2.push(oof);
    }

    // --- choose (k, l2, alpha) by mean per-benchmark train APGR
    let mut names: Vec<&str> = bench.to_vec();
    names.sort();
    names.dedup();
    let groups: Vec<(String, Vec<usize>)> = names
        .iter()
        .map(|b| (b.to_string(), (0..n).filter(|i| bench[*i] == *b).collect()))
        .collect();
    let per_bench = |scores: &[f64]| -> BTreeMap<String, f64> {
        groups
            .iter()
            .map(|(b, idx)| {
                let s: Vec<f64> = idx.iter().map(|&i| scores[i]).collect();
                let smp: Vec<&Sample> = idx.iter().map(|&i| samples[i]).collect();
                (b.clone(), evaluate(&s, &smp).apgr)
            })
            .collect()
    };
    let mut grid = Vec::new();
    let mut best: Option<(f64, usize, usize, f64, Vec<f64>)> = None;
    for &k in &cfg.ks {
        let knn: Vec<f64> = neigh
            .iter()
            .map(|l| {
                let kk = k.min(l.len()).max(1);
                l.iter().take(kk).map(|v| *v as f64).sum::<f64>() / kk as f64
            })
            .collect();
        for (li, &l2) in cfg.l2s.iter().enumerate() {
            for &a in &cfg.alphas {
                let s: Vec<f64> = knn
                    .iter()
                    .zip(&oof_by_l2[li])
                    .map(|(kn, lr)| a * kn + (1.0 - a) * lr)
                    .collect();
                let pb = per_bench(&s);
                let mean_apgr = pb.values().sum::<f64>() / pb.len().max(1) as f64;
                grid.push((k, l2, a, mean_apgr));
                if best.as_ref().is_none_or(|b| mean_apgr > b.0) {
                    best = Some((mean_apgr, k, li, a, s));
                }
            }
        }
    }
    let (_, k, li, alpha, oof_blend) =
        best.ok_or_else(|| ClassifierError::Input("empty hyper-parameter grid".into()))?;
    let l2 = cfg.l2s[li];
    let chosen = per_bench(&oof_blend);

    // --- final head on all train data
    let head = fit_logistic(&x, xd, &labels, l2)?;
    model.w = head.w.iter().map(|v| *v as f32).collect();
    model.w_len = head.w_len as f32;
    model.bias = head.bias as f32;
    model.len_mean = len_mean as f32;
    model.len_std = len_std as f32;
    model.k = k;
    model.alpha = alpha as f32;
    let mut sorted = oof_blend.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    model.quantiles = (0..=100)
        .map(|i| sorted[((n - 1) as f64 * i as f64 / 100.0).round() as usize] as f32)
        .collect();
    let mut counts = BTreeMap::new();
    for b in bench {
        *counts.entry(b.to_string()).or_insert(0) += 1;
    }
    model.info = FitInfo {
        k,
        pca_dim: r,
        alpha,
        l2,
        train_counts: counts,
        train_cv_apgr: chosen.clone(),
        label: "only the strong model (gpt-4-1106-preview) was right, the weak (Mixtral-8x7B) wrong; RouteLLM train split (sha256(prompt)[0] >= 0x33)".into(),
    };
    Ok((model, FitReport { chosen, grid }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(weak: bool, strong: bool, len: usize) -> Sample {
        Sample {
            prompt: "x".repeat(len),
            weak,
            strong,
            subject: "t".into(),
        }
    }

    #[test]
    fn fits_a_separable_toy_problem_and_round_trips() {
        // Two clusters in 8-d: cluster A only-strong, cluster B both right.
        let mut embs = Vec::new();
        let mut data = Vec::new();
        for i in 0..80 {
            let hard = i % 2 == 0;
            let mut e = vec![0.0f32; 8];
            e[if hard { 0 } else { 1 }] = 1.0;
            e[2 + i % 5] = 0.3;
            normalize(&mut e);
            embs.push(e);
            data.push(sample(!hard, true, 10 + i));
        }
        let refs: Vec<&Sample> = data.iter().collect();
        let bench = vec!["toy"; refs.len()];
        let cfg = FitConfig {
            ks: vec![4],
            l2s: vec![1.0],
            alphas: vec![0.0, 0.5, 1.0],
            pca_dim: 4,
            folds: 2,
        };
        let (m, rep) = fit(&embs, &refs, &bench, &cfg).unwrap();
        // A perfect ranking of 50% only-strong prompts scores 0.75 (PGR 1 from 50% on).
        assert!(rep.chosen["toy"] > 0.74, "{:?}", rep.chosen);
        let hard = m.probability(&embs[0], 10).unwrap();
        let easy = m.probability(&embs[1], 11).unwrap();
        assert!(hard > easy + 0.5, "{hard} vs {easy}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.safetensors");
        let set = DifficultyModel::new(vec![("toy".into(), m.clone())]).unwrap();
        set.save(&p).unwrap();
        let back = DifficultyModel::load(&p).unwrap();
        let h = back.score(&embs[0], 10).unwrap();
        assert_eq!(h.part, "toy");
        assert!((h.probability - hard).abs() < 1e-3);
        assert!(h.percentile > back.score(&embs[1], 11).unwrap().percentile);
        assert!(back.score(&[0.0; 3], 1).is_err());
        assert!(back.score(&[f32::NAN; 8], 1).is_err());
        assert!(DifficultyModel::from_bytes(b"garbage", "x").is_err());
        assert!(DifficultyModel::new(Vec::new()).is_err());
    }
}
