//! Multi-rank execution for the engine: the model split over N ranks (tensor parallel attention
//! and MLPs, expert parallel MoE; [`switchyard_model::parallel`]), each rank on its own thread
//! with its own shard and its own paged KV cache (its KV heads only), all driven in lockstep.
//!
//! The engine thread stays the only owner of scheduling state. Each step it broadcasts the same
//! batch to every rank ([`RankGroup::forward_paged`]), every rank runs `forward_paged` on its
//! shard (the collectives inside keep them in step), and rank 0's logits, identical on every
//! rank, are what the sampler sees. This is vLLM's driver-worker split with the in-process
//! communicator in place of NCCL; on the CPU the ranks are threads sharing the machine's cores,
//! useful to verify the sharded execution, not for speed.
//!
//! Nothing is left blocked: a rank that fails aborts the communicator (the model does this), so
//! the other ranks' collectives return errors and every rank replies; a rank whose thread dies
//! drops its channel and its communicator, which does the same. Dropping the group closes the
//! command channels; each rank thread then ends and is joined. A poisoned group stays failed:
//! every later step returns the error.

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use candle_core::Tensor;
use switchyard_model::{
    Checkpoint, Communicator, HyV3Model, InProcessGroup, KvDtype, LoadOptions, Logits, ModelConfig,
    ModelError, MtpOut, MtpSeq, PagedKvCache, PagedSeq,
};

/// Loads the `world` ranks of a model from one checkpoint (one after another: loading needs no
/// collectives), each holding only its slices and one communicator of a fresh in-process group.
/// `progress(done, total)` counts layers over all ranks.
pub fn load_ranks(
    cfg: &ModelConfig,
    ckpt: Arc<Checkpoint>,
    opts: &LoadOptions,
    world: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<HyV3Model>, ModelError> {
    if world <= 1 {
        let m = HyV3Model::load(cfg.clone(), ckpt, opts, progress)?;
        return Ok(vec![m]);
    }
    let layers = cfg.num_hidden_layers;
    let total = layers * world;
    InProcessGroup::new(world)
        .build()
        .into_iter()
        .enumerate()
        .map(|(r, c)| {
            let comm: Arc<dyn Communicator> = Arc::new(c);
            HyV3Model::load_parallel(cfg.clone(), ckpt.clone(), opts, comm, |d, _| {
                progress(r * layers + d, total)
            })
        })
        .collect()
}

/// One rank's part of a paged step: owned copies of the batch, shared by every rank.
#[derive(Debug, Clone)]
struct OwnedSeq {
    tokens: Vec<u32>,
    pos0: usize,
    block_table: Vec<u32>,
    logits: Logits,
}

enum RankCmd {
    /// `forward_paged` on the rank's paged cache.
    Paged(Arc<Vec<OwnedSeq>>),
    /// `forward` over a fresh contiguous cache.
    Fresh(Arc<Vec<u32>>, Logits),
}

type RankReply = Result<Vec<Tensor>, String>;

struct Rank {
    cmd: mpsc::Sender<RankCmd>,
    reply: mpsc::Receiver<RankReply>,
    thread: Option<JoinHandle<()>>,
}

/// N ranks of one model, each on its own thread with its own shard and paged KV cache.
pub struct RankGroup {
    ranks: Vec<Rank>,
    config: ModelConfig,
    dtype: candle_core::DType,
    device: candle_core::Device,
    kv_bytes: usize,
    kv_bytes_per_token: usize,
}

impl std::fmt::Debug for RankGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankGroup")
            .field("world", &self.ranks.len())
            .finish()
    }
}

impl RankGroup {
    /// Starts one thread per rank (`models` in rank order, as [`load_ranks`] returns them);
    /// with `paged = Some((num_blocks, block_size, dtype))` each rank allocates its paged KV
    /// cache of `num_blocks` blocks for its own KV heads.
    pub fn start(
        models: Vec<HyV3Model>,
        paged: Option<(usize, usize, KvDtype)>,
    ) -> Result<Self, String> {
        let first = models
            .first()
            .ok_or("a rank group needs at least one rank")?;
        let config = first.config().clone();
        let (dtype, device) = (first.dtype(), first.device().clone());
        let kv_bytes_per_token = kv_bytes_per_token(&models, paged.map_or(KvDtype::F32, |p| p.2));
        let mut ranks = Vec::with_capacity(models.len());
        let mut kv_bytes = 0;
        for (r, model) in models.into_iter().enumerate() {
            let (cmd_tx, cmd_rx) = mpsc::channel::<RankCmd>();
            let (rep_tx, rep_rx) = mpsc::channel::<RankReply>();
            let (ready_tx, ready_rx) = mpsc::channel::<Result<usize, String>>();
            let thread = std::thread::Builder::new()
                .name(format!("switchyard-rank-{r}"))
                .spawn(move || rank_main(model, paged, cmd_rx, rep_tx, ready_tx))
                .map_err(|e| format!("cannot start the thread of rank {r}: {e}"))?;
            match ready_rx.recv() {
                Ok(Ok(b)) => kv_bytes += b,
                Ok(Err(e)) => return Err(format!("rank {r}: {e}")),
                Err(_) => return Err(format!("rank {r} stopped while starting")),
            }
            ranks.push(Rank {
                cmd: cmd_tx,
                reply: rep_rx,
                thread: Some(thread),
            });
        }
        Ok(Self {
            ranks,
            config,
            dtype,
            device,
            kv_bytes,
            kv_bytes_per_token,
        })
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Compute dtype.
    pub fn dtype(&self) -> candle_core::DType {
        self.dtype
    }

    /// Device of the ranks.
    pub fn device(&self) -> &candle_core::Device {
        &self.device
    }

    /// Bytes of paged KV cache over all ranks.
    pub fn kv_bytes(&self) -> usize {
        self.kv_bytes
    }

    /// KV bytes one token takes over all ranks (replicated KV heads count on each rank).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.kv_bytes_per_token
    }

    /// Runs one paged step on every rank; returns rank 0's logits (as
    /// [`HyV3Model::forward_paged`]).
    pub fn forward_paged(&self, seqs: &[PagedSeq<'_>]) -> Result<Vec<Tensor>, String> {
        let owned: Vec<OwnedSeq> = seqs
            .iter()
            .map(|s| OwnedSeq {
                tokens: s.tokens.to_vec(),
                pos0: s.pos0,
                block_table: s.block_table.to_vec(),
                logits: s.logits,
            })
            .collect();
        let owned = Arc::new(owned);
        self.broadcast(|| RankCmd::Paged(owned.clone()))
    }

    /// Runs `ids` from an empty contiguous cache on every rank; returns rank 0's logits (as
    /// [`HyV3Model::forward`]).
    pub fn forward_fresh(&self, ids: &[u32], which: Logits) -> Result<Tensor, String> {
        let ids = Arc::new(ids.to_vec());
        let mut out = self.broadcast(|| RankCmd::Fresh(ids.clone(), which))?;
        out.pop()
            .ok_or_else(|| "rank 0 returned no logits".to_string())
    }

    /// Sends a command to every rank and waits for every reply (so no rank is still in the
    /// step when this returns). The first failure is reported; a failed rank's own error names
    /// the cause, the others' say the group failed because of it.
    fn broadcast(&self, cmd: impl Fn() -> RankCmd) -> Result<Vec<Tensor>, String> {
        let mut sent = vec![false; self.ranks.len()];
        for (r, rank) in self.ranks.iter().enumerate() {
            sent[r] = rank.cmd.send(cmd()).is_ok();
        }
        let mut first: Option<Vec<Tensor>> = None;
        let mut errors: Vec<(usize, String)> = Vec::new();
        for (r, rank) in self.ranks.iter().enumerate() {
            let reply = if sent[r] {
                rank.reply
                    .recv()
                    .unwrap_or_else(|_| Err(format!("rank {r} has stopped")))
            } else {
                Err(format!("rank {r} has stopped"))
            };
            match reply {
                Ok(t) if r == 0 => first = Some(t),
                Ok(_) => {}
                Err(e) => errors.push((r, e)),
            }
        }
        if errors.is_empty() {
            return first.ok_or_else(|| "rank 0 returned nothing".into());
        }
        // Prefer the error that is not just "the group failed" (the root cause).
        let (r, e) = errors
            .iter()
            .find(|(_, e)| !e.contains("group failed"))
            .unwrap_or(&errors[0]);
        if e.starts_with("rank ") {
            Err(format!("tensor parallel: {e}"))
        } else {
            Err(format!("tensor parallel: rank {r}: {e}"))
        }
    }
}

impl Drop for RankGroup {
    fn drop(&mut self) {
        // Closing the command channels ends every rank's loop.
        let threads: Vec<_> = self
            .ranks
            .iter_mut()
            .filter_map(|r| r.thread.take())
            .collect();
        self.ranks.clear();
        for t in threads {
            let _ = t.join();
        }
    }
}

/// KV bytes per token over all ranks.
fn kv_bytes_per_token(models: &[HyV3Model], dtype: KvDtype) -> usize {
    models
        .iter()
        .map(|m| {
            let c = m.config();
            PagedKvCache::bytes_per_token(m.kv_layers(), m.local_kv_heads(), c.head_dim, dtype)
        })
        .sum()
}

fn rank_main(
    model: HyV3Model,
    paged: Option<(usize, usize, KvDtype)>,
    cmds: mpsc::Receiver<RankCmd>,
    replies: mpsc::Sender<RankReply>,
    ready: mpsc::Sender<Result<usize, String>>,
) {
    let mut kv = match paged {
        Some((blocks, bs, dt)) => match model.try_new_paged_cache(blocks, bs, dt) {
            Ok(kv) => Some(kv),
            Err(e) => {
                let _ = ready.send(Err(format!("allocating the KV cache: {e}")));
                return;
            }
        },
        None => None,
    };
    let _ = ready.send(Ok(kv.as_ref().map_or(0, PagedKvCache::bytes)));
    drop(ready);
    while let Ok(cmd) = cmds.recv() {
        let out = match cmd {
            RankCmd::Paged(seqs) => match kv.as_mut() {
                Some(kv) => {
                    let batch: Vec<PagedSeq<'_>> = seqs
                        .iter()
                        .map(|s| PagedSeq {
                            tokens: &s.tokens,
                            pos0: s.pos0,
                            block_table: &s.block_table,
                            logits: s.logits,
                        })
                        .collect();
                    model.forward_paged(&batch, kv).map_err(|e| e.to_string())
                }
                None => Err("this rank group has no paged KV cache".into()),
            },
            RankCmd::Fresh(ids, which) => {
                let mut cache = model.new_cache();
                model
                    .forward(&ids, &mut cache, which)
                    .map(|t| vec![t])
                    .map_err(|e| e.to_string())
            }
        };
        if replies.send(out).is_err() {
            return;
        }
    }
}

/// The model as the engine drives it: one model on the engine thread, or one shard per rank on
/// rank threads.
pub enum EngineModel {
    /// The whole model.
    Single(Box<HyV3Model>),
    /// Rank shards in rank order ([`load_ranks`]).
    Parallel(Vec<HyV3Model>),
}

impl From<HyV3Model> for EngineModel {
    fn from(m: HyV3Model) -> Self {
        EngineModel::Single(Box::new(m))
    }
}

impl From<Vec<HyV3Model>> for EngineModel {
    fn from(mut v: Vec<HyV3Model>) -> Self {
        if v.len() == 1 {
            EngineModel::Single(Box::new(v.remove(0)))
        } else {
            EngineModel::Parallel(v)
        }
    }
}

impl EngineModel {
    fn first(&self) -> Result<&HyV3Model, String> {
        match self {
            EngineModel::Single(m) => Ok(m),
            EngineModel::Parallel(v) => v.first().ok_or_else(|| "no ranks to run".into()),
        }
    }

    /// KV bytes per token over all ranks.
    pub(crate) fn kv_bytes_per_token(&self, dtype: KvDtype) -> Result<usize, String> {
        match self {
            EngineModel::Single(m) => Ok(kv_bytes_per_token(std::slice::from_ref(m), dtype)),
            EngineModel::Parallel(v) => Ok(kv_bytes_per_token(v, dtype)),
        }
    }

    /// Configuration, compute dtype and device (rank 0's).
    pub(crate) fn facts(
        &self,
    ) -> Result<(ModelConfig, candle_core::DType, candle_core::Device), String> {
        let m = self.first()?;
        Ok((m.config().clone(), m.dtype(), m.device().clone()))
    }

    /// Allocates the paged KV cache(s) and starts the ranks.
    pub(crate) fn into_runner(
        self,
        num_blocks: usize,
        block_size: usize,
        dtype: KvDtype,
    ) -> Result<Runner, String> {
        match self {
            EngineModel::Single(model) => {
                // On a GPU the cache lives in device memory, where the paged-attention kernels
                // read it.
                let kv = model
                    .try_new_paged_cache(num_blocks, block_size, dtype)
                    .map_err(|e| format!("allocating the KV cache ({num_blocks} blocks): {e}"))?;
                Ok(Runner::Single { model, kv })
            }
            EngineModel::Parallel(v) => Ok(Runner::Parallel(Box::new(RankGroup::start(
                v,
                Some((num_blocks, block_size, dtype)),
            )?))),
        }
    }
}

/// What the engine loop runs each step.
pub(crate) enum Runner {
    Single {
        model: Box<HyV3Model>,
        kv: PagedKvCache,
    },
    Parallel(Box<RankGroup>),
}

impl Runner {
    /// Bytes of KV cache (all ranks).
    pub(crate) fn kv_bytes(&self) -> usize {
        match self {
            Runner::Single { kv, .. } => kv.bytes(),
            Runner::Parallel(g) => g.kv_bytes(),
        }
    }

    /// One paged step; rank 0's logits.
    pub(crate) fn forward_paged(&mut self, seqs: &[PagedSeq<'_>]) -> Result<Vec<Tensor>, String> {
        match self {
            Runner::Single { model, kv } => {
                model.forward_paged(seqs, kv).map_err(|e| e.to_string())
            }
            Runner::Parallel(g) => g.forward_paged(seqs),
        }
    }

    /// Whether the model's MTP layer is loaded (one rank only: loading refuses it on several).
    pub(crate) fn has_mtp(&self) -> bool {
        matches!(self, Runner::Single { model, .. } if model.has_mtp())
    }

    /// One paged step with the final-normed hidden states of every computed position
    /// ([`HyV3Model::forward_paged_with_hidden`]); one rank only.
    pub(crate) fn forward_paged_with_hidden(
        &mut self,
        seqs: &[PagedSeq<'_>],
    ) -> Result<(Vec<Tensor>, Tensor), String> {
        match self {
            Runner::Single { model, kv } => model
                .forward_paged_with_hidden(seqs, kv)
                .map_err(|e| e.to_string()),
            Runner::Parallel(_) => Err("MTP drafts run on one rank only".into()),
        }
    }

    /// The MTP layer over a step's positions ([`HyV3Model::mtp_forward_paged`]).
    pub(crate) fn mtp_forward_paged(
        &mut self,
        seqs: &[MtpSeq<'_>],
    ) -> Result<Vec<Option<MtpOut>>, String> {
        match self {
            Runner::Single { model, kv } => {
                model.mtp_forward_paged(seqs, kv).map_err(|e| e.to_string())
            }
            Runner::Parallel(_) => Err("MTP drafts run on one rank only".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use std::time::{Duration, Instant};

    /// Two ranks whose shards disagree (different hidden sizes: a broken deployment) fail their
    /// first collective; the group reports the error instead of hanging, stays failed, and
    /// its threads end when it is dropped.
    #[test]
    fn a_failing_rank_fails_the_step_and_never_hangs() {
        let tmp = tempfile::tempdir().unwrap();
        let mut dirs = Vec::new();
        for (i, hidden) in [64usize, 32].into_iter().enumerate() {
            let mut cfg = switchyard_model::presets::preset("tiny").unwrap();
            cfg.hidden_size = hidden;
            let d = tmp.path().join(format!("m{i}"));
            switchyard_model::test_model::write_random_checkpoint(&cfg, &d, 1, DType::F32).unwrap();
            dirs.push(d);
        }
        let models: Vec<HyV3Model> = InProcessGroup::new(2)
            .build()
            .into_iter()
            .zip(&dirs)
            .map(|(c, d)| {
                HyV3Model::load_dir_parallel(d, &LoadOptions::default(), Arc::new(c)).unwrap()
            })
            .collect();
        let g = RankGroup::start(models, Some((8, 4, KvDtype::F32))).unwrap();
        let t0 = Instant::now();
        let e = g.forward_fresh(&[1, 2, 3], Logits::Last).unwrap_err();
        println!("first step: {e}");
        assert!(e.contains("rank"), "{e}");
        let seq = PagedSeq {
            tokens: &[1, 2],
            pos0: 0,
            block_table: &[0],
            logits: Logits::Last,
        };
        let e2 = g.forward_paged(&[seq]).unwrap_err();
        assert!(e2.contains("group failed"), "{e2}");
        drop(g);
        assert!(t0.elapsed() < Duration::from_secs(30));
    }
}
