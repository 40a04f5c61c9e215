//! [`RouterScorer`]: the router crate's [`SemanticScorer`] backed by MiniLM embeddings — one
//! embedding per prompt feeds both the exemplar categories and the difficulty model.
//!
//! ```no_run
//! use switchyard_classifier::RouterScorer;
//! use switchyard_router::{decide, Policy, RouteRequest, RouterState};
//!
//! let scorer = RouterScorer::load_default().unwrap();
//! let req = RouteRequest::from_prompt("Prove that sqrt(2) is irrational.");
//! let d = decide(&Policy::default_policy(), &req, &RouterState::default(), Some(&scorer));
//! println!("{} {:?}", d.action, d.scores.get("difficulty"));
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use switchyard_router::{ScorerError, SemanticScorer, SemanticScores};

use crate::difficulty::DifficultyModel;
use crate::embed::Embedder;
use crate::error::{ClassifierError, Result};
use crate::exemplars::{load_exemplars, ExemplarIndex};

/// What the scorer reports as `difficulty`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DifficultyScale {
    /// The rank of the prompt's estimated P(only the frontier is right) among the RouteLLM
    /// train prompts, in `0..=1`: a policy's `escalate_difficulty = 0.75` escalates prompts
    /// harder than 75% of those. The default, because raw probabilities rarely pass 0.5.
    #[default]
    Percentile,
    /// The estimated probability itself.
    Probability,
}

/// The files of the shipped router model, under `models/router/`.
pub const EXEMPLARS_FILE: &str = "exemplars.jsonl";
/// Embedding cache of the exemplars (so a start does not re-embed them).
pub const EXEMPLAR_CACHE_FILE: &str = "exemplars.embeddings.safetensors";
/// The fitted difficulty artifact.
pub const DIFFICULTY_FILE: &str = "difficulty.safetensors";

/// `models/router` of this source tree (where the shipped exemplars and artifact live), or
/// `$SWITCHYARD_ROUTER_MODELS` when set.
pub fn default_router_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SWITCHYARD_ROUTER_MODELS").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/router")
}

/// Embeddings → category scores and difficulty.
pub struct RouterScorer {
    embedder: Arc<Embedder>,
    categories: Option<ExemplarIndex>,
    difficulty: Option<DifficultyModel>,
    scale: DifficultyScale,
}

impl std::fmt::Debug for RouterScorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterScorer")
            .field("embedder", &self.embedder)
            .field(
                "categories",
                &self.categories.as_ref().map(|c| c.categories().len()),
            )
            .field(
                "difficulty",
                &self.difficulty.as_ref().map(|d| d.info().clone()),
            )
            .field("scale", &self.scale)
            .finish()
    }
}

impl RouterScorer {
    /// A scorer from parts; either half may be absent.
    pub fn new(
        embedder: Arc<Embedder>,
        categories: Option<ExemplarIndex>,
        difficulty: Option<DifficultyModel>,
    ) -> Self {
        Self {
            embedder,
            categories,
            difficulty,
            scale: DifficultyScale::default(),
        }
    }

    /// The MiniLM found by [`crate::locate_minilm`] and the files in [`default_router_dir`].
    pub fn load_default() -> Result<Self> {
        Self::load(&Arc::new(Embedder::from_spec(None)?), &default_router_dir())
    }

    /// Loads `dir/exemplars.jsonl` (through `dir/exemplars.embeddings.safetensors`) and
    /// `dir/difficulty.safetensors`; a missing file leaves that half out, a malformed one is an
    /// error.
    pub fn load(embedder: &Arc<Embedder>, dir: &Path) -> Result<Self> {
        let ex_path = dir.join(EXEMPLARS_FILE);
        let categories = if ex_path.is_file() {
            let ex = load_exemplars(&ex_path)?;
            Some(ExemplarIndex::build(
                embedder,
                &ex,
                Some(&dir.join(EXEMPLAR_CACHE_FILE)),
            )?)
        } else {
            None
        };
        let d_path = dir.join(DIFFICULTY_FILE);
        let difficulty = if d_path.is_file() {
            let m = DifficultyModel::load(&d_path)?;
            if m.dim() != embedder.dim() {
                return Err(ClassifierError::data(
                    d_path.display(),
                    format!(
                        "fitted on {}-d embeddings, the model gives {}",
                        m.dim(),
                        embedder.dim()
                    ),
                ));
            }
            Some(m)
        } else {
            None
        };
        Ok(Self::new(embedder.clone(), categories, difficulty))
    }

    /// Chooses what `difficulty` reports.
    pub fn with_scale(mut self, scale: DifficultyScale) -> Self {
        self.scale = scale;
        self
    }

    /// The embedder.
    pub fn embedder(&self) -> &Arc<Embedder> {
        &self.embedder
    }

    /// The category index, when loaded.
    pub fn categories(&self) -> Option<&ExemplarIndex> {
        self.categories.as_ref()
    }

    /// The difficulty model, when loaded.
    pub fn difficulty(&self) -> Option<&DifficultyModel> {
        self.difficulty.as_ref()
    }

    /// Scores a prompt whose embedding is already known.
    pub fn score_embedding(&self, emb: &[f32], chars: usize) -> Result<SemanticScores> {
        let mut out = SemanticScores::default();
        if let Some(c) = &self.categories {
            out.categories = c.score_embedding(emb).scores;
        }
        if let Some(d) = &self.difficulty {
            let sc = d.score(emb, chars)?;
            out.difficulty = Some(match self.scale {
                DifficultyScale::Probability => sc.probability,
                DifficultyScale::Percentile => sc.percentile,
            });
        }
        Ok(out)
    }

    /// Scores a prompt (embeds it first).
    pub fn score_text(&self, prompt: &str) -> Result<SemanticScores> {
        let emb = self.embedder.embed(prompt)?;
        self.score_embedding(&emb, prompt.chars().count())
    }
}

impl SemanticScorer for RouterScorer {
    fn score(&self, prompt: &str) -> std::result::Result<SemanticScores, ScorerError> {
        self.score_text(prompt)
            .map_err(|e| ScorerError(e.to_string()))
    }
}
