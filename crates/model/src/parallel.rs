//! Multi-device execution primitives: which slice of the model a rank holds ([`Shard`]), the
//! collectives a sharded forward pass needs ([`Communicator`]), and an in-process communicator
//! for N ranks on N threads of one process ([`InProcessGroup`]).
//!
//! The layout is the one `switchyard plan` computes ([`crate::plan`]; vLLM's tensor parallel
//! plus expert parallel): attention by heads, dense MLPs and the shared expert along their
//! intermediate size, routed experts as whole experts, embedding and lm_head by vocabulary,
//! everything else replicated. The forward pass needs two collectives: a sum (`all_reduce_sum`)
//! after every row-parallel projection, once per attention block, once per MLP or MoE block and
//! once for the embedding lookup, and a gather (`all_gather`) of the lm_head's vocabulary slices.
//!
//! DESIGN.md puts the communicator in `crates/engine`; the trait lives here instead because the
//! model's forward pass calls it and `switchyard-model` cannot depend on the engine. The engine
//! drives the ranks (`switchyard_engine::parallel`).
//!
//! The in-process group is deterministic: the last rank to arrive at a collective computes it
//! once, summing in rank order, and every rank receives that same tensor, so all ranks hold
//! bit-identical activations (and so make identical gate choices). It never hangs on a failed
//! rank: a rank that fails calls [`Communicator::abort`], and a rank that is dropped (its
//! thread returned or panicked) aborts the group from `Drop`; every rank waiting in or later
//! entering a collective then gets [`CommError::GroupFailed`]. An optional timeout turns a rank
//! that never arrives (stuck, not failed) into [`CommError::Timeout`].

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use crate::config::ModelConfig;
use crate::ModelError;

/// The CLI flag that sets the number of ranks (vLLM's name); errors name it.
pub const TP_FLAG: &str = "--tensor-parallel-size";

/// Which part of the model a rank holds: rank `rank` of `world`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This rank, `0..world`.
    pub rank: usize,
    /// Number of ranks (the tensor-parallel size).
    pub world: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self::single()
    }
}

/// Rank `d`'s part of `total` split over `n` ranks as evenly as possible (the first `total % n`
/// ranks one more), as `(start, len)`. The split `switchyard plan` assumes.
pub fn split(total: usize, n: usize, d: usize) -> (usize, usize) {
    let (base, extra) = (total / n, total % n);
    let len = base + usize::from(d < extra);
    let start = d * base + d.min(extra);
    (start, len)
}

impl Shard {
    /// The whole model on one device.
    pub fn single() -> Self {
        Self { rank: 0, world: 1 }
    }

    /// Whether this is the whole model (no collectives needed).
    pub fn is_single(&self) -> bool {
        self.world == 1
    }

    /// Checks that `cfg` can be split over `world` ranks as the plan lays it out; errors name
    /// the config field and the `--tensor-parallel-size` flag.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<(), ModelError> {
        let n = self.world;
        let bad = |field: &str, message: String| {
            Err(ModelError::Sharding {
                field: field.to_string(),
                message,
            })
        };
        if n == 0 {
            return bad(
                "tensor_parallel_size",
                format!("{TP_FLAG} must be at least 1"),
            );
        }
        if self.rank >= n {
            return bad(
                "rank",
                format!("rank {} is out of range for {TP_FLAG} {n}", self.rank),
            );
        }
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        if !nh.is_multiple_of(n) {
            return bad(
                "num_attention_heads",
                format!("num_attention_heads {nh} is not divisible by {TP_FLAG} {n}"),
            );
        }
        if nkv >= n && !nkv.is_multiple_of(n) {
            return bad(
                "num_key_value_heads",
                format!("num_key_value_heads {nkv} is not divisible by {TP_FLAG} {n}"),
            );
        }
        if nkv < n && !n.is_multiple_of(nkv) {
            return bad(
                "num_key_value_heads",
                format!(
                    "{TP_FLAG} {n} is not a multiple of num_key_value_heads {nkv} (with more \
                     ranks than KV heads each KV head is replicated on the same number of ranks)"
                ),
            );
        }
        if cfg.vocab_size < n {
            return bad(
                "vocab_size",
                format!(
                    "vocab_size {} is smaller than {TP_FLAG} {n}",
                    cfg.vocab_size
                ),
            );
        }
        if cfg.layer_kinds.contains(&crate::LayerKind::Dense) && cfg.intermediate_size < n {
            return bad(
                "intermediate_size",
                format!(
                    "intermediate_size {} is smaller than {TP_FLAG} {n}",
                    cfg.intermediate_size
                ),
            );
        }
        Ok(())
    }

    /// `(first query head, query heads)` of this rank.
    pub fn query_heads(&self, cfg: &ModelConfig) -> (usize, usize) {
        let per = cfg.num_attention_heads / self.world;
        (self.rank * per, per)
    }

    /// `(first KV head, KV heads)` of this rank: `kv_heads / N` of them, or the one KV head
    /// its query heads read when there are more ranks than KV heads (replicated).
    pub fn kv_heads(&self, cfg: &ModelConfig) -> (usize, usize) {
        let (nkv, n) = (cfg.num_key_value_heads, self.world);
        if nkv >= n {
            let per = nkv / n;
            (self.rank * per, per)
        } else {
            (self.rank / (n / nkv), 1)
        }
    }

    /// `(start, len)` of this rank's part of `total` (experts, intermediate rows, vocabulary).
    pub fn split(&self, total: usize) -> (usize, usize) {
        split(total, self.world, self.rank)
    }
}

/// Why a collective failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommError {
    /// Another rank failed or left the group; the group cannot be used again.
    #[error("rank {rank}: the tensor-parallel group failed: {reason}")]
    GroupFailed {
        /// The rank reporting it.
        rank: usize,
        /// What happened (names the failing rank).
        reason: String,
    },
    /// Some ranks did not arrive at a collective in time.
    #[error("rank {rank}: timed out after {waited:?} in {op}; ranks {missing:?} never arrived")]
    Timeout {
        /// The rank reporting it.
        rank: usize,
        /// The collective.
        op: String,
        /// How long it waited.
        waited: Duration,
        /// Ranks that had not arrived.
        missing: Vec<usize>,
    },
    /// The ranks called different collectives or passed tensors that do not combine.
    #[error("rank {rank}: {message}")]
    Mismatch {
        /// The rank reporting it.
        rank: usize,
        /// What differs.
        message: String,
    },
}

/// The collectives of a tensor-parallel forward pass. Every rank of a group must call the same
/// collectives in the same order with tensors of the same shape and dtype.
pub trait Communicator: Send + Sync + std::fmt::Debug {
    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// Element-wise sum of every rank's `x`; every rank gets the same (bit-identical) result
    /// in `x`'s dtype. Half-precision inputs are summed in f32.
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor, CommError>;
    /// Every rank's `x` concatenated along `dim` in rank order (sizes along `dim` may differ).
    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor, CommError>;
    /// Marks the group failed so that no rank waits for this one: ranks inside or later
    /// entering a collective get [`CommError::GroupFailed`] naming `reason`.
    fn abort(&self, reason: &str);
}

/// A collective and its argument, so that mismatched calls are caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllReduceSum,
    AllGather(usize),
}

impl Op {
    fn name(&self) -> String {
        match self {
            Op::AllReduceSum => "all_reduce_sum".into(),
            Op::AllGather(d) => format!("all_gather(dim {d})"),
        }
    }
}

#[derive(Debug)]
struct State {
    /// Collectives completed so far.
    round: u64,
    /// The collective being gathered, set by the first rank to arrive.
    op: Option<Op>,
    /// Each rank's input for the collective in progress.
    inputs: Vec<Option<Tensor>>,
    /// The result of the last completed collective (kept until every rank has read it, which
    /// holds because the next one cannot complete before they all arrive again).
    result: Option<Tensor>,
    /// Set once when the group fails; every later call fails with it.
    failed: Option<String>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    state: Mutex<State>,
    arrived: Condvar,
    timeout: Option<Duration>,
}

impl Shared {
    /// The state, even if a rank panicked while holding the lock (the state is only ever
    /// left consistent: the panic would have been in a tensor op before any field changed).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, reason: String) {
        let mut s = self.lock();
        if s.failed.is_none() {
            s.failed = Some(reason);
        }
        drop(s);
        self.arrived.notify_all();
    }
}

/// Builds the ranks of an in-process group.
#[derive(Debug, Clone, Copy)]
pub struct InProcessGroup {
    world: usize,
    timeout: Option<Duration>,
}

impl InProcessGroup {
    /// A group of `world` ranks with no timeout (a rank that fails or is dropped still
    /// releases the others).
    pub fn new(world: usize) -> Self {
        Self {
            world,
            timeout: None,
        }
    }

    /// Fails a collective with [`CommError::Timeout`] when the other ranks do not arrive
    /// within `timeout` (for ranks that hang without failing).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// One communicator per rank, in rank order; hand each to its own thread.
    pub fn build(self) -> Vec<InProcessComm> {
        let shared = Arc::new(Shared {
            world: self.world,
            state: Mutex::new(State {
                round: 0,
                op: None,
                inputs: vec![None; self.world],
                result: None,
                failed: None,
            }),
            arrived: Condvar::new(),
            timeout: self.timeout,
        });
        (0..self.world)
            .map(|rank| InProcessComm {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

/// One rank of an [`InProcessGroup`]. Dropping it fails the group, so a rank whose thread ends
/// (returns or panics) never leaves the others waiting.
#[derive(Debug)]
pub struct InProcessComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl InProcessComm {
    fn collective(&self, op: Op, x: &Tensor) -> Result<Tensor, CommError> {
        let sh = &*self.shared;
        let rank = self.rank;
        let failed = |reason: &str| CommError::GroupFailed {
            rank,
            reason: reason.to_string(),
        };
        let mut s = sh.lock();
        if let Some(r) = &s.failed {
            return Err(failed(r));
        }
        match s.op {
            None => s.op = Some(op),
            Some(o) if o != op => {
                let message = format!(
                    "collective mismatch: this rank called {} while another called {}",
                    op.name(),
                    o.name()
                );
                drop(s);
                sh.fail(format!("rank {rank}: {message}"));
                return Err(CommError::Mismatch { rank, message });
            }
            Some(_) => {}
        }
        if s.inputs[rank].is_some() {
            // Cannot happen with one thread per rank; refuse rather than corrupt the round.
            return Err(CommError::Mismatch {
                rank,
                message: "entered a collective twice (is this communicator shared?)".into(),
            });
        }
        s.inputs[rank] = Some(x.clone());
        let my_round = s.round;
        if s.inputs.iter().all(Option::is_some) {
            let inputs: Vec<Tensor> = s.inputs.iter_mut().filter_map(Option::take).collect();
            s.op = None;
            return match combine(op, &inputs) {
                Ok(y) => {
                    s.result = Some(y.clone());
                    s.round += 1;
                    drop(s);
                    sh.arrived.notify_all();
                    Ok(y)
                }
                Err(message) => {
                    drop(s);
                    let message = format!("ranks disagree in {}: {message}", op.name());
                    sh.fail(format!("rank {rank}: {message}"));
                    Err(CommError::Mismatch { rank, message })
                }
            };
        }
        let start = Instant::now();
        loop {
            if s.round != my_round {
                // The round completed; its result stays until this rank arrives again.
                return s.result.clone().ok_or_else(|| failed("no result"));
            }
            if let Some(r) = &s.failed {
                let r = r.clone();
                // Leave the round clean for nobody: the group is dead.
                s.inputs[rank] = None;
                return Err(failed(&r));
            }
            s = match sh.timeout {
                None => sh.arrived.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(limit) => {
                    let waited = start.elapsed();
                    if waited >= limit {
                        let missing = (0..sh.world).filter(|&r| s.inputs[r].is_none()).collect();
                        let e = CommError::Timeout {
                            rank,
                            op: op.name(),
                            waited,
                            missing,
                        };
                        drop(s);
                        sh.fail(e.to_string());
                        return Err(e);
                    }
                    sh.arrived
                        .wait_timeout(s, limit - waited)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
}

/// Computes a collective from every rank's input, in rank order.
fn combine(op: Op, inputs: &[Tensor]) -> Result<Tensor, String> {
    let first = &inputs[0];
    for (r, t) in inputs.iter().enumerate() {
        if t.dtype() != first.dtype() {
            return Err(format!(
                "rank {r} passed {:?}, rank 0 {:?}",
                t.dtype(),
                first.dtype()
            ));
        }
    }
    let res = match op {
        Op::AllReduceSum => {
            for (r, t) in inputs.iter().enumerate() {
                if t.dims() != first.dims() {
                    return Err(format!(
                        "rank {r} passed shape {:?}, rank 0 {:?}",
                        t.dims(),
                        first.dims()
                    ));
                }
            }
            let half = matches!(first.dtype(), DType::BF16 | DType::F16);
            let widen = |t: &Tensor| {
                if half {
                    t.to_dtype(DType::F32)
                } else {
                    Ok(t.clone())
                }
            };
            (|| {
                let mut acc = widen(first)?;
                for t in &inputs[1..] {
                    acc = (acc + widen(t)?)?;
                }
                acc.to_dtype(first.dtype())
            })()
        }
        Op::AllGather(dim) => Tensor::cat(inputs, dim),
    };
    res.map_err(|e| e.to_string())
}

impl Communicator for InProcessComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor, CommError> {
        self.collective(Op::AllReduceSum, x)
    }

    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor, CommError> {
        self.collective(Op::AllGather(dim), x)
    }

    fn abort(&self, reason: &str) {
        self.shared
            .fail(format!("rank {} failed: {reason}", self.rank));
    }
}

impl Drop for InProcessComm {
    fn drop(&mut self) {
        // Harmless at shutdown (nobody waits); essential when a rank's thread dies early.
        self.shared
            .fail(format!("rank {} left the group", self.rank));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn run<R: Send + 'static>(
        world: usize,
        f: impl Fn(InProcessComm) -> R + Send + Sync + 'static,
    ) -> Vec<R> {
        let f = Arc::new(f);
        let handles: Vec<_> = InProcessGroup::new(world)
            .with_timeout(Duration::from_secs(30))
            .build()
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || f(c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn split_matches_the_plan_and_covers_everything() {
        for (total, n) in [(192, 8), (8, 3), (7, 4), (2, 4), (256, 3)] {
            let mut next = 0;
            for d in 0..n {
                let (s, l) = split(total, n, d);
                assert_eq!(s, next);
                assert_eq!(l, total / n + usize::from(d < total % n));
                next = s + l;
            }
            assert_eq!(next, total);
        }
    }

    #[test]
    fn validation_names_the_field_and_the_flag() {
        let mut cfg = crate::presets::preset("tiny").unwrap(); // 4 heads, 2 KV heads
        let s = |n| Shard { rank: 0, world: n };
        assert!(s(1).validate(&cfg).is_ok());
        assert!(s(2).validate(&cfg).is_ok());
        assert!(s(4).validate(&cfg).is_ok());
        let e = s(3).validate(&cfg).unwrap_err().to_string();
        assert_eq!(
            e,
            "cannot split the model: num_attention_heads 4 is not divisible by \
             --tensor-parallel-size 3"
        );
        assert!(s(0)
            .validate(&cfg)
            .unwrap_err()
            .to_string()
            .contains(TP_FLAG));
        cfg.num_attention_heads = 12;
        cfg.num_key_value_heads = 3;
        let e = s(2).validate(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("num_key_value_heads 3 is not divisible by --tensor-parallel-size 2"),
            "{e}"
        );
        let e = s(4).validate(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("--tensor-parallel-size 4 is not a multiple of num_key_value_heads 3"),
            "{e}"
        );
        assert!(s(6).validate(&cfg).is_ok());
    }

    /// Every query head a rank holds reads a KV head the rank holds (GQA groups never straddle
    /// ranks), with KV heads split or replicated as the plan counts them.
    #[test]
    fn query_heads_find_their_kv_heads_on_their_rank() {
        let mut cfg = crate::presets::preset("tiny").unwrap();
        for (nh, nkv) in [(4, 2), (4, 1), (64, 8), (12, 3), (8, 8)] {
            cfg.num_attention_heads = nh;
            cfg.num_key_value_heads = nkv;
            for n in 1..=16 {
                if (Shard { rank: 0, world: n }).validate(&cfg).is_err() {
                    continue;
                }
                for rank in 0..n {
                    let sh = Shard { rank, world: n };
                    let (q0, qh) = sh.query_heads(&cfg);
                    let (k0, kh) = sh.kv_heads(&cfg);
                    assert_eq!(kh, if nkv >= n { nkv / n } else { 1 });
                    for j in q0..q0 + qh {
                        let kv = j / (nh / nkv);
                        assert!((k0..k0 + kh).contains(&kv), "{nh}/{nkv} tp={n} rank {rank}");
                    }
                }
            }
        }
    }

    #[test]
    fn all_reduce_sums_in_rank_order_and_every_rank_gets_the_same_bits() {
        for world in [1, 2, 3, 4] {
            let out = run(world, move |c| {
                let mut got = Vec::new();
                for step in 0..50 {
                    let v: Vec<f32> = (0..7)
                        .map(|i| ((c.rank() * 31 + i * 7 + step) as f32).sin() * 1e3)
                        .collect();
                    let x = Tensor::from_vec(v, 7, &Device::Cpu).unwrap();
                    got.push(c.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap());
                }
                got
            });
            for step in 0..50 {
                let mut want = vec![0f32; 7];
                for r in 0..world {
                    for (i, w) in want.iter_mut().enumerate() {
                        *w += ((r * 31 + i * 7 + step) as f32).sin() * 1e3;
                    }
                }
                for o in &out {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&o[step]), bits(&want), "world {world} step {step}");
                }
            }
        }
    }

    #[test]
    fn all_gather_concatenates_uneven_parts_in_rank_order() {
        let out = run(3, |c| {
            let r = c.rank();
            let x = Tensor::full(r as f32, (2, r + 1), &Device::Cpu).unwrap();
            c.all_gather(&x, 1).unwrap().to_vec2::<f32>().unwrap()
        });
        for o in out {
            assert_eq!(o, vec![vec![0., 1., 1., 2., 2., 2.]; 2]);
        }
    }

    #[test]
    fn a_failing_rank_releases_the_others_with_an_error() {
        // Rank 2 fails after two collectives (aborts), rank 3 returns early (dropped); the
        // others must get errors promptly, not hang until the 30 s timeout.
        let t0 = Instant::now();
        let out = run(4, |c| {
            let x = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
            for step in 0..5 {
                if c.rank() == 2 && step == 2 {
                    c.abort("injected failure");
                    return Err("aborted".to_string());
                }
                if c.rank() == 3 && step == 3 {
                    return Err("dropped".to_string());
                }
                c.all_reduce_sum(&x).map_err(|e| e.to_string())?;
            }
            Ok(())
        });
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        for (r, o) in out.iter().enumerate() {
            let e = o.as_ref().unwrap_err();
            if r < 2 {
                assert!(e.contains("rank 2 failed: injected failure"), "{e}");
            }
        }
    }

    #[test]
    fn a_panicking_rank_releases_the_others() {
        let out = run(2, |c| {
            let x = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                if c.rank() == 1 {
                    panic!("rank 1 crashed");
                }
                c.all_reduce_sum(&x).map(|_| ())
            }));
            match r {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("panicked".into()),
            }
        });
        let e = out[0].as_ref().unwrap_err();
        assert!(e.contains("rank 1 left the group"), "{e}");
    }

    #[test]
    fn a_rank_that_never_arrives_times_out() {
        let comms = InProcessGroup::new(2)
            .with_timeout(Duration::from_millis(200))
            .build();
        let x = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        let e = comms[0].all_reduce_sum(&x).unwrap_err();
        assert!(
            matches!(e, CommError::Timeout { ref missing, .. } if missing == &[1]),
            "{e}"
        );
        // The group is now failed for everyone.
        assert!(comms[1].all_reduce_sum(&x).is_err());
    }

    #[test]
    fn mismatched_collectives_fail_the_group() {
        let out = run(2, |c| {
            let x = Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap();
            if c.rank() == 0 {
                c.all_reduce_sum(&x).map(|_| ())
            } else {
                c.all_gather(&x, 0).map(|_| ())
            }
        });
        assert!(out.iter().all(|o| o.is_err()));
    }
}
