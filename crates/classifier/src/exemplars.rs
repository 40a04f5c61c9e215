//! A nearest-exemplar category classifier: labelled example prompts
//! (`models/router/exemplars.jsonl`, one `{"text", "category", "action", "source"}` per line)
//! are embedded once; a prompt's similarity to a category is the mean cosine of its
//! [`TOP`] most similar exemplars of that category.
//!
//! Scores: a softmax over the category similarities (temperature [`Params::temperature`]),
//! times a relevance gate that falls to 0 when even the best similarity is low (a prompt far
//! from every exemplar is about none of the categories, whatever the softmax says). So a
//! score is in `0..=1` and comparable to the policy's `classifier.min_confidence`.
//!
//! Every category carries a router action (`local`, `escalate`, `local-only`, `block`); the
//! policy's `[classifier.categories]` table is what `decide` consults, and a test checks the
//! two agree.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use switchyard_router::Action;

use crate::cache::embed_cached;
use crate::embed::{dot, Embedder};
use crate::error::{ClassifierError, Result};

/// Exemplars averaged per category: the best 3 (max alone is noisy, the mean of all drowns a
/// category with varied exemplars; 3 did best in leave-one-out on the shipped set).
pub const TOP: usize = 3;

/// One labelled prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exemplar {
    /// The prompt.
    pub text: String,
    /// Its category (a name in the policy's `[classifier.categories]`).
    pub category: String,
    /// The action the category maps to.
    pub action: Action,
    /// Where it came from (`semantic-router` or `switchyard`).
    #[serde(default)]
    pub source: String,
}

/// Reads an exemplar JSONL file (blank lines and `//` lines skipped). Every category must map
/// to one action throughout.
pub fn load_exemplars(path: &Path) -> Result<Vec<Exemplar>> {
    let text = std::fs::read_to_string(path).map_err(|e| ClassifierError::io(path, e))?;
    parse_exemplars(&text, &path.display().to_string())
}

/// [`load_exemplars`] from a string; `origin` names it in errors.
pub fn parse_exemplars(text: &str, origin: &str) -> Result<Vec<Exemplar>> {
    let mut out: Vec<Exemplar> = Vec::new();
    let mut actions: BTreeMap<String, Action> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with("//") {
            continue;
        }
        let e: Exemplar = serde_json::from_str(l)
            .map_err(|err| ClassifierError::data(origin, format!("line {}: {err}", i + 1)))?;
        if e.text.trim().is_empty() || e.category.trim().is_empty() {
            return Err(ClassifierError::data(
                origin,
                format!("line {}: empty text or category", i + 1),
            ));
        }
        if let Some(a) = actions.insert(e.category.clone(), e.action) {
            if a != e.action {
                return Err(ClassifierError::data(
                    origin,
                    format!(
                        "line {}: category `{}` maps to {} here and {} earlier",
                        i + 1,
                        e.category,
                        e.action,
                        a
                    ),
                ));
            }
        }
        out.push(e);
    }
    if out.is_empty() {
        return Err(ClassifierError::data(origin, "no exemplars"));
    }
    Ok(out)
}

/// Scoring knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Softmax temperature over category similarities (cosine units).
    pub temperature: f32,
    /// Best similarity at or below which the gate is 0.
    pub gate_low: f32,
    /// Best similarity at or above which the gate is 1.
    pub gate_high: f32,
}

impl Default for Params {
    /// MiniLM cosines between unrelated prompts sit around 0.0–0.3 and between paraphrases
    /// at 0.6+; the gate opens across 0.30–0.50. Temperature 0.05 makes a 0.05 cosine lead
    /// worth a factor e.
    fn default() -> Self {
        Self {
            temperature: 0.05,
            gate_low: 0.30,
            gate_high: 0.50,
        }
    }
}

/// A prompt's category scores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CategoryScores {
    /// Category → score in `0..=1`.
    pub scores: BTreeMap<String, f64>,
    /// Category → mean cosine of its best exemplars.
    pub similarity: BTreeMap<String, f64>,
    /// The best-scoring category and its score.
    pub top: Option<(String, f64)>,
}

/// What [`ExemplarIndex::leave_one_out`] measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeaveOneOut {
    /// Share of exemplars whose nearest other category is their own.
    pub category_accuracy: f64,
    /// Share whose nearest category maps to their action.
    pub action_accuracy: f64,
    /// `(true category, predicted)` for every category miss.
    pub misses: Vec<(String, String)>,
}

/// Embedded exemplars, grouped by category.
#[derive(Debug, Clone)]
pub struct ExemplarIndex {
    categories: Vec<(String, Action)>,
    /// Per category, its exemplars' unit embeddings.
    vectors: Vec<Vec<Vec<f32>>>,
    params: Params,
}

impl ExemplarIndex {
    /// Embeds `exemplars` (through the cache file `cache`, when given, so a server start does
    /// not re-embed hundreds of prompts).
    pub fn build(
        embedder: &Embedder,
        exemplars: &[Exemplar],
        cache: Option<&Path>,
    ) -> Result<Self> {
        let texts: Vec<&str> = exemplars.iter().map(|e| e.text.as_str()).collect();
        let embs = match cache {
            Some(p) => embed_cached(embedder, &texts, p, |_, _| {})?,
            None => embedder.embed_batch(&texts)?,
        };
        Ok(Self::from_embeddings(exemplars, embs))
    }

    /// Builds from precomputed unit embeddings (`embs[i]` for `exemplars[i]`).
    pub fn from_embeddings(exemplars: &[Exemplar], embs: Vec<Vec<f32>>) -> Self {
        let mut categories: Vec<(String, Action)> = Vec::new();
        let mut vectors: Vec<Vec<Vec<f32>>> = Vec::new();
        for (e, v) in exemplars.iter().zip(embs) {
            let i = match categories.iter().position(|(c, _)| *c == e.category) {
                Some(i) => i,
                None => {
                    categories.push((e.category.clone(), e.action));
                    vectors.push(Vec::new());
                    categories.len() - 1
                }
            };
            vectors[i].push(v);
        }
        Self {
            categories,
            vectors,
            params: Params::default(),
        }
    }

    /// Replaces the scoring knobs.
    pub fn with_params(mut self, params: Params) -> Self {
        self.params = params;
        self
    }

    /// Category names and their actions, in file order.
    pub fn categories(&self) -> &[(String, Action)] {
        &self.categories
    }

    /// The action a category maps to.
    pub fn action(&self, category: &str) -> Option<Action> {
        self.categories
            .iter()
            .find(|(c, _)| c == category)
            .map(|(_, a)| *a)
    }

    /// Scores a unit embedding. `skip` drops one exemplar `(category index, exemplar index)`
    /// (leave-one-out evaluation).
    pub fn score_embedding(&self, emb: &[f32]) -> CategoryScores {
        self.score_inner(emb, None)
    }

    fn score_inner(&self, emb: &[f32], skip: Option<(usize, usize)>) -> CategoryScores {
        let p = self.params;
        let sims: Vec<f32> = self
            .vectors
            .iter()
            .enumerate()
            .map(|(ci, vs)| {
                let mut s: Vec<f32> = vs
                    .iter()
                    .enumerate()
                    .filter(|(ei, _)| skip != Some((ci, *ei)))
                    .map(|(_, v)| dot(emb, v))
                    .filter(|x| x.is_finite())
                    .collect();
                if s.is_empty() {
                    return -1.0;
                }
                s.sort_by(|a, b| b.total_cmp(a));
                let k = TOP.min(s.len());
                s[..k].iter().sum::<f32>() / k as f32
            })
            .collect();
        let best = sims.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let gate = if best.is_finite() {
            ((best - p.gate_low) / (p.gate_high - p.gate_low).max(1e-6)).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let t = p.temperature.max(1e-4);
        let exps: Vec<f64> = sims
            .iter()
            .map(|s| (((s - best) / t) as f64).exp())
            .collect();
        let z: f64 = exps.iter().sum::<f64>().max(1e-300);
        let mut scores = BTreeMap::new();
        let mut similarity = BTreeMap::new();
        let mut top: Option<(String, f64)> = None;
        for (((name, _), e), s) in self.categories.iter().zip(&exps).zip(&sims) {
            let v = e / z * gate as f64;
            scores.insert(name.clone(), v);
            similarity.insert(name.clone(), *s as f64);
            if top.as_ref().is_none_or(|(_, b)| v > *b) {
                top = Some((name.clone(), v));
            }
        }
        CategoryScores {
            scores,
            similarity,
            top,
        }
    }

    /// Leave-one-out evaluation over the index's own exemplars: the share whose nearest
    /// category is their own, the share whose nearest category has their action, and the
    /// category misses as `(true category, predicted)`.
    pub fn leave_one_out(&self) -> LeaveOneOut {
        let mut total = 0;
        let mut right = 0;
        let mut action_right = 0;
        let mut misses = Vec::new();
        for (ci, vs) in self.vectors.iter().enumerate() {
            for (ei, v) in vs.iter().enumerate() {
                total += 1;
                let s = self.score_inner(v, Some((ci, ei)));
                let sims = &s.similarity;
                let pred = sims
                    .iter()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(c, _)| c.clone())
                    .unwrap_or_default();
                if self.action(&pred) == Some(self.categories[ci].1) {
                    action_right += 1;
                }
                if pred == self.categories[ci].0 {
                    right += 1;
                } else {
                    misses.push((self.categories[ci].0.clone(), pred));
                }
            }
        }
        let n = total.max(1) as f64;
        LeaveOneOut {
            category_accuracy: right as f64 / n,
            action_accuracy: action_right as f64 / n,
            misses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(text: &str, cat: &str, action: Action) -> Exemplar {
        Exemplar {
            text: text.into(),
            category: cat.into(),
            action,
            source: "test".into(),
        }
    }

    #[test]
    fn parse_rejects_conflicting_actions_and_bad_lines() {
        let ok = r#"{"text":"a","category":"x","action":"local"}
// comment

{"text":"b","category":"x","action":"local"}"#;
        assert_eq!(parse_exemplars(ok, "t").unwrap().len(), 2);
        let bad = r#"{"text":"a","category":"x","action":"local"}
{"text":"b","category":"x","action":"block"}"#;
        assert!(parse_exemplars(bad, "t")
            .unwrap_err()
            .to_string()
            .contains("line 2"));
        assert!(parse_exemplars("{", "t").is_err());
        assert!(parse_exemplars("", "t").is_err());
        assert!(parse_exemplars(r#"{"text":" ","category":"x","action":"local"}"#, "t").is_err());
    }

    #[test]
    fn scores_pick_the_nearest_category_and_gate_far_prompts() {
        let exs = vec![
            ex("a", "alpha", Action::Local),
            ex("b", "beta", Action::Escalate),
        ];
        let idx = ExemplarIndex::from_embeddings(&exs, vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
        let s = idx.score_embedding(&[0.9, 0.436]);
        assert_eq!(s.top.as_ref().unwrap().0, "alpha");
        assert!(s.top.unwrap().1 > 0.9);
        let far = idx.score_embedding(&[-0.7, -0.7]);
        assert!(far.scores.values().all(|v| *v == 0.0));
        assert_eq!(idx.action("beta"), Some(Action::Escalate));
        let nan = idx.score_embedding(&[f32::NAN, 0.0]);
        assert!(nan.scores.values().all(|v| v.is_finite()));
    }
}
