//! The routed experts of one MoE layer on the CPU with bf16 weights, in two parallel passes
//! over all active experts at once: gate+up with SiLU·mul fused, then down. The general path
//! ([`crate::experts_forward`] over candle ops) runs about a dozen tensor ops and two parallel
//! regions per expert; at decode that is 8 experts × (2 thread wake-ups + small allocations)
//! per layer for a few MiB of weights, and the overhead, not the memory, sets the speed.
//!
//! Layout: the (token, slot) entries are grouped by expert as the [`DispatchPlan`] orders
//! them. The gate+up pass splits every active expert's intermediate rows into tasks of
//! `ROWS_PER_TASK` rows, so work spreads over the cores whether one expert or all of them
//! are active, and each task writes its own `[rows, tokens]` block. The down pass splits the
//! hidden rows instead: each task runs every expert over its rows and adds the weighted
//! results into its rows of the `[H, T]` output, in group order (the top-k reduction, with
//! no per-entry buffer). Accumulation is f32 throughout (the SiLU·mul activations are not
//! rounded to bf16 in between, except for groups on the AMX tiles or the `vdpbf16ps` row
//! kernel, which take bf16 inputs; see `kernel_for`).
//!
//! The shared expert joins the same two passes ([`experts_forward_bf16`] with `shared`), and
//! a dense MLP runs through them alone ([`mlp_forward_bf16`]): two parallel loops instead of
//! two matmuls plus candle's SiLU and mul. Those two are rounded to bf16 exactly where the
//! unfused bf16 tensor ops round, so fusing them changes no result.

use half::bf16;
use rayon::prelude::*;

use crate::cpu_amx;
use crate::cpu_bf16dot::{self, Pairs};
use crate::cpu_gemv::{Bf16Rows, SharedOut, WeightRows, TOKEN_BLOCK};
use crate::gate::GateOutput;
use crate::moe::DispatchPlan;
use crate::KernelError;

/// Output rows per task: as `cpu_gemv`'s (a few hundred KiB of weights per task at Hy3 sizes).
const ROWS_PER_TASK: usize = 64;

/// Shapes: `E` experts, intermediate `I`, hidden `H`.
#[derive(Debug, Clone, Copy)]
pub struct ExpertDims {
    /// Routed experts.
    pub experts: usize,
    /// Intermediate size of one expert.
    pub inter: usize,
    /// Hidden size.
    pub hidden: usize,
}

/// `out[t] = Σ_j w_j · down_e(silu(gate_e(x_t)) · up_e(x_t))` over the gate's choices, for
/// `x` `[T, H]` f32, `gate_up` `[E, 2I, H]` and `down` `[E, H, I]` bf16; returns `[T, H]` f32.
/// With `shared`, an ungated shared expert runs in the same two passes, rounded as
/// [`mlp_forward_bf16`] rounds, and is added as the unfused bf16 path adds it: the routed sum
/// and the shared output each rounded to bf16, then summed in f32 (transformers' fp32
/// combine).
pub fn experts_forward_bf16(
    x: &[f32],
    gate_up: &[bf16],
    down: &[bf16],
    dims: ExpertDims,
    gate: &GateOutput,
    plan: &DispatchPlan,
    shared: Option<MlpWeights<'_>>,
) -> Result<Vec<f32>, KernelError> {
    let ExpertDims {
        experts: e,
        inter: i,
        hidden: h,
    } = dims;
    let t = gate.tokens;
    if x.len() != t * h
        || gate_up.len() != e * 2 * i * h
        || down.len() != e * h * i
        || plan.num_experts != e
        || plan.offsets.len() != e + 1
    {
        return Err(KernelError::InvalidArgument(format!(
            "experts_forward_bf16 shapes: x {} for [{t}, {h}], gate_up {} for [{e}, {}, {h}], down {} for [{e}, {h}, {i}], plan for {} experts",
            x.len(),
            gate_up.len(),
            2 * i,
            down.len(),
            plan.num_experts
        )));
    }
    if let Some(s) = &shared {
        s.check(h, "experts_forward_bf16 shared expert")?;
    }
    let expert = |ex: usize| {
        let w = MlpWeights {
            gate_up: &gate_up[ex * 2 * i * h..(ex + 1) * 2 * i * h],
            down: &down[ex * h * i..(ex + 1) * h * i],
            inter: i,
        };
        w.group(h, false)
    };
    let shared = shared.map(|w| w.group(h, true));
    Ok(run_routed(x, h, gate, plan, expert, shared))
}

/// The routed experts (`expert(e)` is expert `e`'s group) over `plan`'s entries and an
/// optional shared expert over one more entry per token, through [`run_groups`].
pub(crate) fn run_routed<W: WeightRows>(
    x: &[f32],
    h: usize,
    gate: &GateOutput,
    plan: &DispatchPlan,
    expert: impl Fn(usize) -> Group<W>,
    shared: Option<Group<W>>,
) -> Vec<f32> {
    let t = gate.tokens;
    let entries = plan.token_of.len();
    let mut groups: Vec<Group<W>> = plan
        .active_experts()
        .map(|ex| Group {
            lo: plan.offsets[ex],
            n: plan.count(ex),
            ..expert(ex)
        })
        .collect();
    let mut token_of = plan.token_of.clone();
    let mut weight: Vec<f32> = plan
        .slot_of
        .iter()
        .map(|&s| gate.weights[s as usize])
        .collect();
    if let Some(g) = shared {
        groups.push(Group {
            lo: entries,
            n: t,
            ..g
        });
        token_of.extend(0..t as u32);
        weight.resize(entries + t, 1.0);
    }
    run_groups(x, t, h, &groups, &token_of, &weight)
}

/// One SwiGLU MLP's bf16 weights: gate+up `[2·inter, H]` (gate rows first) and down
/// `[H, inter]`, row-major.
#[derive(Debug, Clone, Copy)]
pub struct MlpWeights<'a> {
    /// `[2·inter, H]`.
    pub gate_up: &'a [bf16],
    /// `[H, inter]`.
    pub down: &'a [bf16],
    /// Intermediate size.
    pub inter: usize,
}

impl<'a> MlpWeights<'a> {
    /// This MLP as a [`Group`] (entries set by the caller).
    fn group(&self, h: usize, bf16_ops: bool) -> Group<Bf16Rows<'a>> {
        Group {
            gate_up: Bf16Rows::new(self.gate_up, h),
            down: Bf16Rows::new(self.down, self.inter),
            inter: self.inter,
            lo: 0,
            n: 0,
            bf16_ops,
        }
    }

    fn check(&self, h: usize, what: &str) -> Result<(), KernelError> {
        if self.gate_up.len() != 2 * self.inter * h || self.down.len() != h * self.inter {
            return Err(KernelError::InvalidArgument(format!(
                "{what}: gate_up {} for [{}, {h}], down {} for [{h}, {}]",
                self.gate_up.len(),
                2 * self.inter,
                self.down.len(),
                self.inter
            )));
        }
        Ok(())
    }
}

/// `out[t] = mlp(x_t)` for `x` `[T, H]` f32: a dense SwiGLU MLP (a dense layer, or a shared
/// expert on its own) in the same two passes. Rounded as candle's bf16 ops round (projections,
/// SiLU and product to bf16): the same result as `gate_up` matmul, SiLU, mul and `down`
/// matmul on bf16 tensors, once the caller rounds it to bf16.
pub fn mlp_forward_bf16(
    x: &[f32],
    tokens: usize,
    hidden: usize,
    mlp: MlpWeights<'_>,
) -> Result<Vec<f32>, KernelError> {
    mlp.check(hidden, "mlp_forward_bf16")?;
    if x.len() != tokens * hidden {
        return Err(KernelError::InvalidArgument(format!(
            "mlp_forward_bf16: x {} for [{tokens}, {hidden}]",
            x.len()
        )));
    }
    Ok(run_dense(x, tokens, hidden, mlp.group(hidden, true)))
}

/// One MLP over every token: entries are the tokens in order, each weighted 1.
pub(crate) fn run_dense<W: WeightRows>(
    x: &[f32],
    tokens: usize,
    hidden: usize,
    g: Group<W>,
) -> Vec<f32> {
    let groups = [Group {
        lo: 0,
        n: tokens,
        ..g
    }];
    let token_of: Vec<u32> = (0..tokens as u32).collect();
    run_groups(x, tokens, hidden, &groups, &token_of, &vec![1.0; tokens])
}

/// One MLP (gate+up `[2·inter, H]`, gate rows first, and down `[H, inter]`, in any weight
/// storage) and the entries (rows of the gathered activations) it runs on: `lo..lo + n`.
pub(crate) struct Group<W> {
    pub(crate) gate_up: W,
    pub(crate) down: W,
    pub(crate) inter: usize,
    pub(crate) lo: usize,
    pub(crate) n: usize,
    /// Round as the unfused bf16 candle ops do (see [`silu_mul_bf16`]) and add the output
    /// to the bf16-rounded sum so far, so the fused path changes no result. Off for routed
    /// experts, whose activations have always stayed in f32 here.
    pub(crate) bf16_ops: bool,
}

/// Runs every group over its entries and returns `out[t] = Σ weight_p · group_p(x[token_p])`
/// over the entries `p` of token `t` (`[T, H]` f32). `token_of`/`weight` are per entry; the
/// groups cover the entries in order.
fn run_groups<W: WeightRows>(
    x: &[f32],
    t: usize,
    h: usize,
    groups: &[Group<W>],
    token_of: &[u32],
    weight: &[f32],
) -> Vec<f32> {
    let packing = W::packing();
    let entries = token_of.len();
    // Groups with enough entries run on the AMX tiles, or else on the `vdpbf16ps` kernel
    // (bf16 activations either way; see `kernel_for`).
    let exact = std::sync::OnceLock::new();
    let kernel: Vec<Kernel> = groups
        .iter()
        .map(|g| kernel_for(g, h, || *exact.get_or_init(|| cpu_amx::bf16_exact(x))))
        .collect();

    // Each entry's activation row in the row kernels' layout (tile and bf16-dot groups are
    // packed apart; with no FMA row-kernel group nothing is allocated).
    let rows_needed = groups
        .iter()
        .zip(&kernel)
        .any(|(g, &k)| k == Kernel::Rows && g.n > 0);
    let mut xs = vec![0f32; if rows_needed { entries * h } else { 0 }];
    // A token's row is packed once and copied to its other entries (at decode every routed
    // expert and the shared one see the same token: one pack instead of k + 1).
    let mut packed_at: Vec<Option<usize>> = vec![None; if rows_needed { t } else { 0 }];
    for (g, _) in groups
        .iter()
        .zip(&kernel)
        .filter(|(_, &k)| k == Kernel::Rows)
    {
        for p in g.lo..g.lo + g.n {
            let tok = token_of[p] as usize;
            match packed_at[tok] {
                Some(q) => xs.copy_within(q * h..(q + 1) * h, p * h),
                None => {
                    packing.pack_row(&x[tok * h..(tok + 1) * h], &mut xs[p * h..(p + 1) * h]);
                    packed_at[tok] = Some(p);
                }
            }
        }
    }
    let row_of = |g: &Group<W>, k: usize| {
        let tok = token_of[g.lo + k] as usize;
        &x[tok * h..(tok + 1) * h]
    };
    // Tile and bf16-dot groups' activations, packed per group in parallel.
    let (x_tiles, x_pairs): (Vec<Option<cpu_amx::Packed>>, Vec<Option<Pairs>>) = groups
        .par_iter()
        .zip(&kernel)
        .map(|(g, &k)| {
            (
                (k == Kernel::Tiles).then(|| cpu_amx::Packed::from_rows(g.n, h, |k| row_of(g, k))),
                (k == Kernel::Bf16Dot).then(|| Pairs::from_rows(g.n, h, |k| row_of(g, k))),
            )
        })
        .unzip();
    // Group g's `[inter, n]` activation block starts at `act_at[g]`.
    let mut act_at = Vec::with_capacity(groups.len() + 1);
    act_at.push(0);
    for g in groups {
        act_at.push(act_at.last().unwrap() + g.inter * g.n);
    }
    let act_len = *act_at.last().unwrap();

    // Pass 1: act = silu(gate · x) * (up · x), per group `[I, n]` (row-major over rows).
    let mut act = vec![0f32; act_len];
    tasks(&mut act, groups, |g| g.inter)
        .into_par_iter()
        .for_each(|task| {
            let g = &groups[task.group];
            let (n, i) = (g.n, g.inter);
            let combine = |gv: f32, uv: f32| {
                if g.bf16_ops {
                    silu_mul_bf16(gv, uv)
                } else {
                    silu(gv) * uv
                }
            };
            if let Some(px) = &x_tiles[task.group] {
                let (rows, pad) = (task.out.len() / n, px.padded());
                let mut gu = vec![0f32; 2 * rows * pad];
                let (gb, ub) = gu.split_at_mut(rows * pad);
                g.gate_up.tile_block(task.row0, px, gb);
                g.gate_up.tile_block(i + task.row0, px, ub);
                for (k, dst) in task.out.chunks_mut(n).enumerate() {
                    for (t, d) in dst.iter_mut().enumerate() {
                        *d = combine(gb[k * pad + t], ub[k * pad + t]);
                    }
                }
                return;
            }
            if let Some(px) = &x_pairs[task.group] {
                let mut gu = vec![0f32; 2 * task.out.len()];
                let (gb, ub) = gu.split_at_mut(task.out.len());
                g.gate_up.dot_pairs_rows(task.row0, px, gb);
                g.gate_up.dot_pairs_rows(i + task.row0, px, ub);
                for ((d, &gv), &uv) in task.out.iter_mut().zip(&*gb).zip(&*ub) {
                    *d = combine(gv, uv);
                }
                return;
            }
            let xe = &xs[g.lo * h..(g.lo + n) * h];
            let (mut gv, mut uv) = ([0f32; TOKEN_BLOCK], [0f32; TOKEN_BLOCK]);
            for (k, dst) in task.out.chunks_mut(n).enumerate() {
                let r = task.row0 + k;
                for t0 in (0..n).step_by(TOKEN_BLOCK) {
                    let nb = TOKEN_BLOCK.min(n - t0);
                    let xb = &xe[t0 * h..(t0 + nb) * h];
                    g.gate_up.dot(r, xb, nb, &mut gv[..nb]);
                    g.gate_up.dot(i + r, xb, nb, &mut uv[..nb]);
                    for j in 0..nb {
                        dst[t0 + j] = combine(gv[j], uv[j]);
                    }
                }
            }
        });

    // Token-major activations (`[n, I]` per group) in the row kernels' layout for the down
    // projection; tile and bf16-dot groups pack their `[I, n]` block as it is.
    let mut act_t = vec![0f32; if rows_needed { act_len } else { 0 }];
    let (act_tiles, act_pairs): (Vec<Option<cpu_amx::Packed>>, Vec<Option<Pairs>>) = groups
        .par_iter()
        .enumerate()
        .map(|(gi, g)| {
            let blk = &act[act_at[gi]..act_at[gi + 1]];
            (
                (kernel[gi] == Kernel::Tiles)
                    .then(|| cpu_amx::Packed::from_columns(blk, g.inter, g.n)),
                (kernel[gi] == Kernel::Bf16Dot).then(|| Pairs::from_columns(blk, g.inter, g.n)),
            )
        })
        .unzip();
    let mut row = Vec::new();
    for (gi, g) in groups.iter().enumerate() {
        let (n, i) = (g.n, g.inter);
        let blk = &act[act_at[gi]..act_at[gi + 1]];
        if kernel[gi] != Kernel::Rows {
            continue;
        }
        if n == 0 || i == 0 {
            continue;
        }
        let dst = &mut act_t[act_at[gi]..act_at[gi + 1]];
        row.resize(i, 0f32);
        for (tk, d) in dst.chunks_exact_mut(i).enumerate() {
            for (r, v) in row.iter_mut().enumerate() {
                *v = blk[r * n + tk];
            }
            packing.pack_row(&row, d);
        }
    }

    // Pass 2: y = down · act per group, weighted into the tokens (the top-k reduction) in
    // group order. Each task owns a block of hidden rows of `[H, T]` and runs every group
    // over it, so no `[entries, H]` buffer is written (at a 2048-token chunk of the `small`
    // preset that was 75 MB of fresh pages per layer). The task's `[rows, T]` block goes into
    // its columns of every token's row of `out` at its end, so the transpose to `[T, H]` runs
    // in parallel too (serially after the loop it was ~2% of a bf16 prefill, the other worker
    // idle).
    let mut out = vec![0f32; t * h];
    let out_at = SharedOut::new(&mut out);
    (0..h.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(dst, y), c| {
                let r0 = c * ROWS_PER_TASK;
                let rows = ROWS_PER_TASK.min(h - r0);
                dst.clear();
                dst.resize(rows * t, 0f32);
                for (gi, g) in groups.iter().enumerate() {
                    let (n, i) = (g.n, g.inter);
                    if n == 0 {
                        continue;
                    }
                    // `y` `[rows, stride]`: this block's rows of the group's down projection.
                    let stride = match (&act_tiles[gi], &act_pairs[gi]) {
                        (Some(pa), _) => {
                            y.resize(rows * pa.padded(), 0f32);
                            g.down.tile_block(r0, pa, y);
                            pa.padded()
                        }
                        (None, Some(pa)) => {
                            y.resize(rows * n, 0f32);
                            g.down.dot_pairs_rows(r0, pa, y);
                            n
                        }
                        (None, None) => {
                            y.resize(rows * n, 0f32);
                            let ae = &act_t[act_at[gi]..act_at[gi + 1]];
                            for (k, yk) in y.chunks_mut(n).enumerate() {
                                for t0 in (0..n).step_by(TOKEN_BLOCK) {
                                    let nb = TOKEN_BLOCK.min(n - t0);
                                    let a = &ae[t0 * i..(t0 + nb) * i];
                                    g.down.dot(r0 + k, a, nb, &mut yk[t0..t0 + nb]);
                                }
                            }
                            n
                        }
                    };
                    for (k, o) in dst.chunks_mut(t).enumerate() {
                        let yk = &y[k * stride..k * stride + n];
                        for (tk, &yv) in yk.iter().enumerate() {
                            let p = g.lo + tk;
                            let (v, wgt) = (&mut o[token_of[p] as usize], weight[p]);
                            *v = if g.bf16_ops {
                                round_bf16(*v) + wgt * round_bf16(yv)
                            } else {
                                *v + wgt * yv
                            };
                        }
                    }
                }
                for tok in 0..t {
                    // SAFETY: `out` holds `t × h` values and this task alone writes columns
                    // `r0..r0 + rows` of each token's row; `out` outlives the parallel loop.
                    let o = unsafe { out_at.slice(tok * h + r0, rows) };
                    for (k, v) in o.iter_mut().enumerate() {
                        *v = dst[k * t + tok];
                    }
                }
            },
        );
    out
}

/// Whether group `g` runs on the AMX tiles: at least [`cpu_amx::min_tokens`] entries, both
/// matrices on tiles ([`WeightRows::tiles`]), and for bf16 weights inputs that are bf16 values
/// already (`exact`). Its activations are then rounded to bf16 before each projection (bf16
/// weights: the inputs already are bf16 values, and the routed experts' SiLU·mul products are
/// rounded as a bf16 model's tensors hold them; Q8 weights:
/// [`crate::cpu_gemv::Tiles::RoundedInputs`]).
fn on_tiles<W: WeightRows>(g: &Group<W>, h: usize, exact: impl Fn() -> bool) -> bool {
    g.gate_up.cols() == h && g.gate_up.tiles().take(g.n, &exact) && g.down.tiles().take(g.n, &exact)
}

/// Which kernels multiply a group's two projections.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// The row kernels of the weight storage (`WeightRows::dot`), f32 activations.
    Rows,
    /// The AMX tiles (`on_tiles`).
    Tiles,
    /// The `vdpbf16ps` row kernel ([`crate::cpu_bf16dot`]): as on the tiles, for groups with
    /// bf16-exact inputs, and the SiLU·mul products rounded to bf16 before the down
    /// projection.
    Bf16Dot,
}

/// The tiles where they take the group, else the `vdpbf16ps` kernel where it does
/// ([`cpu_bf16dot::take`] on both matrices: bf16 on bf16-exact inputs, or quantized), else
/// the row kernels.
fn kernel_for<W: WeightRows>(g: &Group<W>, h: usize, exact: impl Fn() -> bool) -> Kernel {
    if on_tiles(g, h, &exact) {
        Kernel::Tiles
    } else if g.gate_up.cols() == h
        && cpu_bf16dot::take(g.n, g.gate_up.bf16_dot(), &exact)
        && cpu_bf16dot::take(g.n, g.down.bf16_dot(), &exact)
    {
        Kernel::Bf16Dot
    } else {
        Kernel::Rows
    }
}

fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

fn round_bf16(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

/// `silu(g) · u` rounded step by step as candle's bf16 ops compute it on bf16 tensors: the
/// projections rounded to bf16, then `g / (1 + exp(-g))` with each operation rounded, then
/// the product rounded.
fn silu_mul_bf16(g: f32, u: f32) -> f32 {
    let (g, u) = (round_bf16(g), round_bf16(u));
    let e = round_bf16((-g).exp());
    let s = round_bf16(g / round_bf16(1.0 + e));
    round_bf16(s * u)
}

/// A block of output rows of one group: rows `row0..row0 + out.len() / n`, each holding the
/// group's `n` values.
struct Task<'a> {
    group: usize,
    row0: usize,
    out: &'a mut [f32],
}

/// Splits `buf` (every group's `[rows(g), n]` block, in group order) into tasks of at most
/// [`ROWS_PER_TASK`] rows.
fn tasks<'a, W>(
    buf: &'a mut [f32],
    groups: &[Group<W>],
    rows: impl Fn(&Group<W>) -> usize,
) -> Vec<Task<'a>> {
    let mut out = Vec::new();
    let mut rest = buf;
    for (gi, g) in groups.iter().enumerate() {
        if g.n == 0 {
            continue;
        }
        let (blk, tail) = rest.split_at_mut(rows(g) * g.n);
        rest = tail;
        for (c, chunk) in blk.chunks_mut(ROWS_PER_TASK * g.n).enumerate() {
            out.push(Task {
                group: gi,
                row0: c * ROWS_PER_TASK,
                out: chunk,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::{gate_topk, GateConfig};
    use crate::moe::dispatch;
    use rand::{Rng, SeedableRng};

    /// `down · (silu(gate · x) * (up · x))` in f64 for one activation row, and per output the
    /// sum of the magnitudes of its terms (what bf16 rounding errors scale with).
    fn mlp_f64(gate_up: &[bf16], down: &[bf16], inter: usize, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let h = x.len();
        let dot = |row: usize| -> f64 {
            (0..h)
                .map(|c| gate_up[row * h + c].to_f64() * x[c] as f64)
                .sum()
        };
        let act: Vec<f64> = (0..inter)
            .map(|r| {
                let (a, b) = (dot(r), dot(inter + r));
                a / (1.0 + (-a).exp()) * b
            })
            .collect();
        let term = |c: usize, r: usize| down[c * inter + r].to_f64() * act[r];
        let y = (0..h)
            .map(|c| (0..inter).map(|r| term(c, r)).sum())
            .collect();
        let mag = (0..h)
            .map(|c| (0..inter).map(|r| term(c, r).abs()).sum())
            .collect();
        (y, mag)
    }

    /// Against plain f64 arithmetic per token and choice, on bf16 weights: decode (one token),
    /// a prefill batch where some experts get no token, and sizes off the kernels' steps.
    #[test]
    fn matches_per_token_f64_loop() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for &(t, h, i, e, k) in &[
            (1, 64, 32, 8, 2),
            (37, 72, 40, 16, 4),
            (5, 33, 7, 6, 6),
            (130, 64, 70, 4, 1),
        ] {
            let rnd = |rng: &mut rand::rngs::StdRng, n: usize| -> Vec<f32> {
                (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
            };
            let x = rnd(&mut rng, t * h);
            let gu: Vec<bf16> = rnd(&mut rng, e * 2 * i * h)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let dn: Vec<bf16> = rnd(&mut rng, e * h * i)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            // Biased logits leave some experts without tokens.
            let logits: Vec<f32> = (0..t * e)
                .map(|j| rng.random_range(-1.0..1.0) + if j % e < 2 { 3.0 } else { 0.0 })
                .collect();
            let cfg = GateConfig::sigmoid(e, k, 1.5);
            let g = gate_topk(&logits, None, &cfg).unwrap();
            let plan = dispatch(&g, e).unwrap();
            let dims = ExpertDims {
                experts: e,
                inter: i,
                hidden: h,
            };
            // A shared expert with its own intermediate size, and the same MLP run dense.
            let si = i + 3;
            let sgu: Vec<bf16> = rnd(&mut rng, 2 * si * h)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let sdn: Vec<bf16> = rnd(&mut rng, h * si)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let shared = MlpWeights {
                gate_up: &sgu,
                down: &sdn,
                inter: si,
            };
            let got = experts_forward_bf16(&x, &gu, &dn, dims, &g, &plan, None).unwrap();
            let got_sh = experts_forward_bf16(&x, &gu, &dn, dims, &g, &plan, Some(shared)).unwrap();
            let got_dense = mlp_forward_bf16(&x, t, h, shared).unwrap();
            // The shared and dense paths round to bf16 along the way (exactness against the
            // unfused ops is `moe::tests`); here only a bound of bf16 size relative to the
            // magnitude of the parts summed (`scale`).
            let close = |a: f32, b: f64, scale: f64, what: &str, tok: usize, c: usize| {
                let tol = if what == "routed" { 1e-3 } else { 2e-2 };
                assert!(
                    (a as f64 - b).abs() <= tol * (1.0 + scale),
                    "{what} {t}x{h}x{i}x{e}: t{tok} c{c}: {a} vs {b}"
                );
            };
            for tok in 0..t {
                let xr = &x[tok * h..(tok + 1) * h];
                let mut want = vec![0f64; h];
                for j in 0..k {
                    let ex = g.ids[tok * k + j] as usize;
                    let wt = g.weights[tok * k + j] as f64;
                    let (y, _) = mlp_f64(
                        &gu[ex * 2 * i * h..(ex + 1) * 2 * i * h],
                        &dn[ex * h * i..(ex + 1) * h * i],
                        i,
                        xr,
                    );
                    for (o, v) in want.iter_mut().zip(y) {
                        *o += wt * v;
                    }
                }
                let (sy, smag) = mlp_f64(&sgu, &sdn, si, xr);
                for c in 0..h {
                    let (w, y) = (want[c], sy[c]);
                    close(got[tok * h + c], w, w.abs(), "routed", tok, c);
                    let both = w.abs() + smag[c];
                    close(got_sh[tok * h + c], w + y, both, "routed+shared", tok, c);
                    close(got_dense[tok * h + c], y, smag[c], "dense", tok, c);
                }
            }
        }
        // Shapes that disagree are errors.
        let g = GateOutput {
            tokens: 1,
            top_k: 1,
            ids: vec![0],
            weights: vec![1.0],
        };
        let plan = dispatch(&g, 2).unwrap();
        let dims = ExpertDims {
            experts: 2,
            inter: 2,
            hidden: 4,
        };
        assert!(experts_forward_bf16(
            &[0.0; 3],
            &[bf16::ZERO; 32],
            &[bf16::ZERO; 16],
            dims,
            &g,
            &plan,
            None
        )
        .is_err());
    }

    /// Groups big enough for the AMX tiles (bf16 inputs, tile-sized shapes) against f64 on the
    /// same bf16 inputs. The tiles round the routed SiLU·mul products to bf16, so the bound is
    /// bf16-sized; where the CPU has no AMX this checks the `vdpbf16ps` kernel (or the FMA row
    /// kernels) on the same shapes.
    #[test]
    fn tile_sized_groups_match_f64() {
        bf16_groups_match_f64(12, 64, 64, 32);
    }

    /// As [`tile_sized_groups_match_f64`] on shapes the tiles cannot take (odd hidden and
    /// intermediate sizes): the `vdpbf16ps` kernel where the CPU has AVX512-BF16, which rounds
    /// the SiLU·mul products as the tiles do.
    #[test]
    fn odd_sized_bf16_groups_match_f64() {
        bf16_groups_match_f64(13, 50, 37, 21);
    }

    /// Routed experts (hidden `h`, intermediate `i`) and a shared expert (intermediate `si`) on
    /// bf16 inputs, every group with at least 8 entries, against f64.
    fn bf16_groups_match_f64(seed: u64, h: usize, i: usize, si: usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (t, e, k) = (70, 4, 2);
        let rnd_bf16 = |rng: &mut rand::rngs::StdRng, n: usize| -> Vec<bf16> {
            (0..n)
                .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
                .collect()
        };
        let x: Vec<f32> = rnd_bf16(&mut rng, t * h)
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let gu = rnd_bf16(&mut rng, e * 2 * i * h);
        let dn = rnd_bf16(&mut rng, e * h * i);
        let (sgu, sdn) = (rnd_bf16(&mut rng, 2 * si * h), rnd_bf16(&mut rng, h * si));
        let shared = MlpWeights {
            gate_up: &sgu,
            down: &sdn,
            inter: si,
        };
        let logits: Vec<f32> = (0..t * e).map(|_| rng.random_range(-1.0..1.0)).collect();
        let g = gate_topk(&logits, None, &GateConfig::sigmoid(e, k, 1.0)).unwrap();
        let plan = dispatch(&g, e).unwrap();
        assert!(plan
            .active_experts()
            .all(|ex| plan.count(ex) >= cpu_amx::min_tokens().max(cpu_bf16dot::min_tokens())));
        let dims = ExpertDims {
            experts: e,
            inter: i,
            hidden: h,
        };
        let got = experts_forward_bf16(&x, &gu, &dn, dims, &g, &plan, Some(shared)).unwrap();
        let dense = mlp_forward_bf16(&x, t, h, shared).unwrap();
        for tok in 0..t {
            let xr = &x[tok * h..(tok + 1) * h];
            let (sy, smag) = mlp_f64(&sgu, &sdn, si, xr);
            let (mut want, mut mag) = (sy.clone(), smag.clone());
            for j in 0..k {
                let ex = g.ids[tok * k + j] as usize;
                let wt = g.weights[tok * k + j] as f64;
                let (y, m) = mlp_f64(
                    &gu[ex * 2 * i * h..(ex + 1) * 2 * i * h],
                    &dn[ex * h * i..(ex + 1) * h * i],
                    i,
                    xr,
                );
                for c in 0..h {
                    want[c] += wt * y[c];
                    mag[c] += wt.abs() * m[c];
                }
            }
            for c in 0..h {
                let (a, b) = (got[tok * h + c] as f64, want[c]);
                assert!(
                    (a - b).abs() <= 1e-2 * (1.0 + mag[c]),
                    "t{tok} c{c}: {a} vs {b}"
                );
                let (a, b) = (dense[tok * h + c] as f64, sy[c]);
                assert!(
                    (a - b).abs() <= 1e-2 * (1.0 + smag[c]),
                    "dense t{tok} c{c}: {a} vs {b}"
                );
            }
        }
    }
}
