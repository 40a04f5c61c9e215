//! Quantized weights of either format — [`crate::cpu_q8`] (8-bit) or [`crate::cpu_q4`]
//! (4-bit) — behind one set of types, which is what a model holds after in-situ quantization:
//! a projection ([`QuantMatrix`], [`linear_quant`]), a SwiGLU MLP ([`QuantMlp`],
//! [`mlp_quant`]) and a layer's routed experts ([`QuantExperts`], [`experts_quant`]).
//!
//! The format is chosen once per matrix; an MLP's two matrices, and all of a layer's experts
//! and its shared expert, share one, so each call dispatches on the format once and then runs
//! the row kernels, AMX tiles and MoE passes of `cpu_gemv`/`cpu_moe`, written once over any
//! weight storage.

use candle_core::Tensor;

use crate::cpu_gemv::WeightRows;
use crate::cpu_moe::{run_dense, run_routed, ExpertDims, Group};
use crate::cpu_q4::Q4Matrix;
use crate::cpu_q8::{Q8Matrix, Q8Source, Values};
use crate::gate::GateOutput;
use crate::moe::DispatchPlan;
use crate::KernelError;

/// A quantization format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    /// int8 with an f32 scale per 64 inputs ([`crate::cpu_q8`]), 8.5 bits per weight.
    Q8,
    /// 4 bits with an f16 step and minimum per 32 inputs ([`crate::cpu_q4`]), 5 bits per
    /// weight.
    Q4,
}

impl QuantKind {
    /// The format's name (`q8`, `q4`).
    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q8 => "q8",
            QuantKind::Q4 => "q4",
        }
    }

    /// Bytes a quantized `[rows, cols]` matrix holds (`cols` a multiple of 64): what
    /// [`QuantMatrix::memory_bytes`] of one will say, known before any weight is read — for
    /// memory plans and the loader's check that the weights fit.
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> usize {
        match self {
            QuantKind::Q8 => Q8Matrix::memory_bytes_for(rows, cols),
            QuantKind::Q4 => Q4Matrix::memory_bytes_for(rows, cols),
        }
    }
}

/// A quantized `[rows, cols]` weight matrix (`cols` a multiple of 64).
#[derive(Debug, Clone)]
pub enum QuantMatrix {
    /// 8-bit.
    Q8(Q8Matrix),
    /// 4-bit.
    Q4(Q4Matrix),
}

impl From<Q8Matrix> for QuantMatrix {
    fn from(m: Q8Matrix) -> Self {
        QuantMatrix::Q8(m)
    }
}

impl From<Q4Matrix> for QuantMatrix {
    fn from(m: Q4Matrix) -> Self {
        QuantMatrix::Q4(m)
    }
}

/// Calls `$body` with `$w` bound to the concrete matrix of a [`QuantMatrix`].
macro_rules! with_matrix {
    ($m:expr, $w:ident => $body:expr) => {
        match $m {
            QuantMatrix::Q8($w) => $body,
            QuantMatrix::Q4($w) => $body,
        }
    };
}

impl QuantMatrix {
    /// Quantizes a row-major `[rows, cols]` matrix to `kind`.
    pub fn quantize<T: Q8Source>(
        kind: QuantKind,
        w: &[T],
        rows: usize,
        cols: usize,
    ) -> Result<Self, KernelError> {
        Ok(match kind {
            QuantKind::Q8 => Q8Matrix::quantize(w, rows, cols)?.into(),
            QuantKind::Q4 => Q4Matrix::quantize(w, rows, cols)?.into(),
        })
    }

    /// Quantizes a 2-D CPU tensor `[rows, cols]` to `kind` (bf16 read in place; other dtypes
    /// through f32).
    pub fn from_tensor(kind: QuantKind, w: &Tensor) -> Result<Self, KernelError> {
        let (rows, cols) = w.dims2()?;
        crate::cpu_q8::with_values(w, |v| match v {
            Values::Bf16(s) => Self::quantize(kind, s, rows, cols),
            Values::F32(s) => Self::quantize(kind, s, rows, cols),
        })
    }

    /// The format.
    pub fn kind(&self) -> QuantKind {
        match self {
            QuantMatrix::Q8(_) => QuantKind::Q8,
            QuantMatrix::Q4(_) => QuantKind::Q4,
        }
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        with_matrix!(self, w => w.rows())
    }

    /// Inputs per row.
    pub fn cols(&self) -> usize {
        with_matrix!(self, w => w.cols())
    }

    /// Bytes held.
    pub fn memory_bytes(&self) -> usize {
        with_matrix!(self, w => w.memory_bytes())
    }

    /// The weights the kernels multiply, exact in f64 (`q · scale`, `q · d + m`), `[rows,
    /// cols]` row-major: for references and error bounds.
    pub fn dequantize_f64(&self) -> Vec<f64> {
        match self {
            QuantMatrix::Q8(w) => w.dequantize().iter().map(|&v| v as f64).collect(),
            QuantMatrix::Q4(w) => w.dequantize_f64(),
        }
    }

    /// Per weight, the magnitude of the offset the kernels sum apart from the scaled codes
    /// (Q4's block minimum `|m|`; 0 for Q8, which has none), `[rows, cols]` row-major: for
    /// error bounds.
    pub fn offsets_f64(&self) -> Vec<f64> {
        match self {
            QuantMatrix::Q8(w) => vec![0.0; w.rows() * w.cols()],
            QuantMatrix::Q4(w) => (0..w.rows())
                .flat_map(|r| (0..w.cols()).map(move |c| w.code(r, c).2.to_f64().abs()))
                .collect(),
        }
    }

    /// `y = x · deq(w)ᵀ` for `x` `[tokens, cols]` f32 into `y` `[tokens, rows]`: the format's
    /// `gemv_q8` / `gemv_q4`.
    pub fn gemv(&self, x: &[f32], tokens: usize, y: &mut [f32]) -> Result<(), KernelError> {
        match self {
            QuantMatrix::Q8(w) => crate::cpu_q8::gemv_q8(x, tokens, w, y),
            QuantMatrix::Q4(w) => crate::cpu_q4::gemv_q4(x, tokens, w, y),
        }
    }

    /// Whether a product of `tokens` activation rows rounds its operands to bf16 (on the AMX
    /// tiles, or where they are missing on the `vdpbf16ps` kernel) rather than running on the
    /// integer row kernels.
    pub fn on_tiles(&self, tokens: usize) -> bool {
        with_matrix!(self, w => w.tiles().take(tokens, || false)
            || crate::cpu_bf16dot::take(tokens, w.bf16_dot(), || false))
    }
}

/// The concrete matrix type a [`QuantMatrix`] of one format holds, for code written once over
/// the formats (the kinds are checked where MLPs and expert sets are built).
trait Format: WeightRows + Sized {
    fn of(m: &QuantMatrix) -> &Self;
}

impl Format for Q8Matrix {
    fn of(m: &QuantMatrix) -> &Self {
        match m {
            QuantMatrix::Q8(w) => w,
            _ => unreachable!("a Q8 set holds only Q8 matrices (checked when built)"),
        }
    }
}

impl Format for Q4Matrix {
    fn of(m: &QuantMatrix) -> &Self {
        match m {
            QuantMatrix::Q4(w) => w,
            _ => unreachable!("a Q4 set holds only Q4 matrices (checked when built)"),
        }
    }
}

/// `x · deq(w)ᵀ` for a CPU tensor `x` `[T, cols]` of any float dtype; the result `[T, rows]`
/// has `x`'s dtype. What a model's `Linear` calls with a quantized weight.
pub fn linear_quant(x: &Tensor, w: &QuantMatrix) -> Result<Tensor, KernelError> {
    let (tokens, inp) = x.dims2()?;
    let (rows, cols) = (w.rows(), w.cols());
    if !x.device().is_cpu() || inp != cols {
        return Err(KernelError::InvalidArgument(format!(
            "linear_quant: x [{tokens}, {inp}] on {:?} for a {} weight [{rows}, {cols}] (CPU \
             only)",
            x.device(),
            w.kind().name(),
        )));
    }
    if tokens == 0 {
        return Ok(Tensor::zeros((0, rows), x.dtype(), x.device())?);
    }
    let xv = cpu_f32(x, "linear_quant")?;
    let mut y = vec![0f32; tokens * rows];
    w.gemv(&xv, tokens, &mut y)?;
    let t = Tensor::from_vec(y, (tokens, rows), x.device())?;
    Ok(t.to_dtype(x.dtype())?)
}

/// A quantized SwiGLU MLP: gate+up `[2·inter, hidden]` (gate rows first) and down
/// `[hidden, inter]`, as [`crate::cpu_moe::MlpWeights`] holds them in bf16, both in one format.
#[derive(Debug, Clone)]
pub struct QuantMlp {
    gate_up: QuantMatrix,
    down: QuantMatrix,
}

impl QuantMlp {
    /// Pairs two quantized matrices; errors unless `gate_up` is `[2·I, H]` and `down` `[H, I]`
    /// in the same format.
    pub fn new(
        gate_up: impl Into<QuantMatrix>,
        down: impl Into<QuantMatrix>,
    ) -> Result<Self, KernelError> {
        let (gate_up, down) = (gate_up.into(), down.into());
        if gate_up.rows() != 2 * down.cols() || gate_up.cols() != down.rows() {
            return Err(KernelError::InvalidArgument(format!(
                "quantized MLP: gate_up [{}, {}] and down [{}, {}] are not [2·I, H] and [H, I]",
                gate_up.rows(),
                gate_up.cols(),
                down.rows(),
                down.cols()
            )));
        }
        if gate_up.kind() != down.kind() {
            return Err(KernelError::InvalidArgument(format!(
                "quantized MLP: gate_up is {}, down is {}",
                gate_up.kind().name(),
                down.kind().name()
            )));
        }
        Ok(Self { gate_up, down })
    }

    /// Quantizes `gate_up` `[2·inter, hidden]` and `down` `[hidden, inter]` (row-major).
    pub fn quantize<T: Q8Source>(
        kind: QuantKind,
        gate_up: &[T],
        down: &[T],
        inter: usize,
        hidden: usize,
    ) -> Result<Self, KernelError> {
        Self::new(
            QuantMatrix::quantize(kind, gate_up, 2 * inter, hidden)?,
            QuantMatrix::quantize(kind, down, hidden, inter)?,
        )
    }

    /// Quantizes 2-D CPU tensors `gate_up` `[2·I, H]` and `down` `[H, I]`.
    pub fn from_tensors(
        kind: QuantKind,
        gate_up: &Tensor,
        down: &Tensor,
    ) -> Result<Self, KernelError> {
        Self::new(
            QuantMatrix::from_tensor(kind, gate_up)?,
            QuantMatrix::from_tensor(kind, down)?,
        )
    }

    /// The format.
    pub fn kind(&self) -> QuantKind {
        self.gate_up.kind()
    }

    /// Intermediate size.
    pub fn inter(&self) -> usize {
        self.down.cols()
    }

    /// Hidden size.
    pub fn hidden(&self) -> usize {
        self.down.rows()
    }

    /// The fused gate+up matrix `[2·I, H]`.
    pub fn gate_up(&self) -> &QuantMatrix {
        &self.gate_up
    }

    /// The down matrix `[H, I]`.
    pub fn down(&self) -> &QuantMatrix {
        &self.down
    }

    /// Bytes both matrices hold.
    pub fn memory_bytes(&self) -> usize {
        self.gate_up.memory_bytes() + self.down.memory_bytes()
    }

    fn group<M: Format>(&self) -> Group<&M> {
        Group {
            gate_up: M::of(&self.gate_up),
            down: M::of(&self.down),
            inter: self.inter(),
            lo: 0,
            n: 0,
            bf16_ops: false,
        }
    }
}

/// A layer's routed experts, one [`QuantMlp`] per expert (all the same shape and format).
#[derive(Debug, Clone)]
pub struct QuantExperts {
    experts: Vec<QuantMlp>,
}

impl QuantExperts {
    /// Collects per-expert MLPs (e.g. quantized one by one while loading); errors when there
    /// are none or their shapes or formats differ.
    pub fn new(experts: Vec<QuantMlp>) -> Result<Self, KernelError> {
        let Some(first) = experts.first() else {
            return Err(KernelError::InvalidArgument(
                "quantized experts: no experts".into(),
            ));
        };
        let key = |m: &QuantMlp| (m.inter(), m.hidden(), m.kind());
        if let Some(e) = experts.iter().position(|m| key(m) != key(first)) {
            let (i, h, k) = key(&experts[e]);
            let (i0, h0, k0) = key(first);
            return Err(KernelError::InvalidArgument(format!(
                "quantized experts: expert {e} is {} [inter {i}, hidden {h}], expert 0 is {} \
                 [inter {i0}, hidden {h0}]",
                k.name(),
                k0.name()
            )));
        }
        Ok(Self { experts })
    }

    /// Quantizes stacked expert weights as [`crate::cpu_moe::experts_forward_bf16`] takes
    /// them: `gate_up` `[E, 2I, H]` and `down` `[E, H, I]`.
    pub fn quantize<T: Q8Source>(
        kind: QuantKind,
        gate_up: &[T],
        down: &[T],
        dims: ExpertDims,
    ) -> Result<Self, KernelError> {
        let ExpertDims {
            experts: e,
            inter: i,
            hidden: h,
        } = dims;
        if gate_up.len() != e * 2 * i * h || down.len() != e * h * i {
            return Err(KernelError::InvalidArgument(format!(
                "quantized experts: gate_up {} for [{e}, {}, {h}], down {} for [{e}, {h}, {i}]",
                gate_up.len(),
                2 * i,
                down.len()
            )));
        }
        Self::new(
            gate_up
                .chunks_exact(2 * i * h)
                .zip(down.chunks_exact(h * i))
                .map(|(gu, dn)| QuantMlp::quantize(kind, gu, dn, i, h))
                .collect::<Result<_, _>>()?,
        )
    }

    /// Quantizes stacked 3-D CPU tensors `gate_up` `[E, 2I, H]` and `down` `[E, H, I]`.
    pub fn from_tensors(
        kind: QuantKind,
        gate_up: &Tensor,
        down: &Tensor,
    ) -> Result<Self, KernelError> {
        let (e, i2, h) = gate_up.dims3()?;
        let dims = ExpertDims {
            experts: e,
            inter: i2 / 2,
            hidden: h,
        };
        crate::cpu_q8::with_values(gate_up, |gu| {
            crate::cpu_q8::with_values(down, |dn| match (gu, dn) {
                (Values::Bf16(a), Values::Bf16(b)) => Self::quantize(kind, a, b, dims),
                (Values::F32(a), Values::F32(b)) => Self::quantize(kind, a, b, dims),
                _ => Err(KernelError::InvalidArgument(
                    "quantized experts: gate_up and down have different dtypes".into(),
                )),
            })
        })
    }

    /// The format.
    pub fn kind(&self) -> QuantKind {
        self.experts[0].kind()
    }

    /// `E`, `I` and `H`.
    pub fn dims(&self) -> ExpertDims {
        ExpertDims {
            experts: self.experts.len(),
            inter: self.experts[0].inter(),
            hidden: self.experts[0].hidden(),
        }
    }

    /// Expert `e`.
    pub fn expert(&self, e: usize) -> &QuantMlp {
        &self.experts[e]
    }

    /// Bytes every expert holds.
    pub fn memory_bytes(&self) -> usize {
        self.experts.iter().map(QuantMlp::memory_bytes).sum()
    }
}

/// [`crate::cpu_moe::experts_forward_bf16`] with quantized experts (and shared expert): `x`
/// `[T, H]` f32, returns `[T, H]` f32 = `Σ_j w_j · expert_j(x_t)` (+ `shared(x_t)`). Unlike the
/// bf16 path, nothing is rounded to bf16 on the way (there is no unfused quantized path to
/// agree with): sums and SiLU·mul stay f32, and each projection's input is rounded to 16 bits
/// per block of 64 as in `gemv_q8` — except in groups (an expert's entries, the shared
/// expert's tokens) that run on the AMX tiles, where inputs and dequantized weights are
/// rounded to bf16.
pub fn experts_forward_quant(
    x: &[f32],
    experts: &QuantExperts,
    gate: &GateOutput,
    plan: &DispatchPlan,
    shared: Option<&QuantMlp>,
) -> Result<Vec<f32>, KernelError> {
    let ExpertDims {
        experts: e,
        hidden: h,
        ..
    } = experts.dims();
    let t = gate.tokens;
    if x.len() != t * h || plan.num_experts != e || plan.offsets.len() != e + 1 {
        return Err(KernelError::InvalidArgument(format!(
            "experts_forward_quant shapes: x {} for [{t}, {h}], plan for {} experts, layer has \
             {e}",
            x.len(),
            plan.num_experts
        )));
    }
    if let Some(s) = shared {
        if s.hidden() != h || s.kind() != experts.kind() {
            return Err(KernelError::InvalidArgument(format!(
                "experts_forward_quant: shared expert {} hidden {} for experts' {} {h}",
                s.kind().name(),
                s.hidden(),
                experts.kind().name()
            )));
        }
    }
    fn run<M: Format>(
        x: &[f32],
        h: usize,
        experts: &QuantExperts,
        gate: &GateOutput,
        plan: &DispatchPlan,
        shared: Option<&QuantMlp>,
    ) -> Vec<f32> {
        let expert = |ex: usize| experts.experts[ex].group::<M>();
        run_routed(x, h, gate, plan, expert, shared.map(QuantMlp::group::<M>))
    }
    Ok(match experts.kind() {
        QuantKind::Q8 => run::<Q8Matrix>(x, h, experts, gate, plan, shared),
        QuantKind::Q4 => run::<Q4Matrix>(x, h, experts, gate, plan, shared),
    })
}

/// [`crate::cpu_moe::mlp_forward_bf16`] with quantized weights: `x` `[tokens, H]` f32 →
/// `[tokens, H]` f32, rounded as [`experts_forward_quant`] rounds.
pub fn mlp_forward_quant(
    x: &[f32],
    tokens: usize,
    mlp: &QuantMlp,
) -> Result<Vec<f32>, KernelError> {
    let h = mlp.hidden();
    if x.len() != tokens * h {
        return Err(KernelError::InvalidArgument(format!(
            "mlp_forward_quant: x {} for [{tokens}, {h}]",
            x.len()
        )));
    }
    Ok(match mlp.kind() {
        QuantKind::Q8 => run_dense(x, tokens, h, mlp.group::<Q8Matrix>()),
        QuantKind::Q4 => run_dense(x, tokens, h, mlp.group::<Q4Matrix>()),
    })
}

/// [`mlp_forward_quant`] on a CPU tensor `x` `[T, H]` (any float dtype); returns `[T, H]` f32.
pub fn mlp_quant(x: &Tensor, mlp: &QuantMlp) -> Result<Tensor, KernelError> {
    let (t, _) = x.dims2()?;
    let xf = cpu_f32(x, "mlp_quant")?;
    let y = mlp_forward_quant(&xf, t, mlp)?;
    Ok(Tensor::from_vec(y, (t, mlp.hidden()), x.device())?)
}

/// [`experts_forward_quant`] on a CPU tensor `x` `[T, H]` (any float dtype); returns `[T, H]`
/// f32.
pub fn experts_quant(
    x: &Tensor,
    experts: &QuantExperts,
    gate: &GateOutput,
    plan: &DispatchPlan,
    shared: Option<&QuantMlp>,
) -> Result<Tensor, KernelError> {
    let (t, h) = x.dims2()?;
    let xf = cpu_f32(x, "experts_quant")?;
    let y = experts_forward_quant(&xf, experts, gate, plan, shared)?;
    Ok(Tensor::from_vec(y, (t, h), x.device())?)
}

fn cpu_f32(x: &Tensor, what: &str) -> Result<Vec<f32>, KernelError> {
    if !x.device().is_cpu() {
        return Err(KernelError::InvalidArgument(format!(
            "{what}: x is not on the CPU (the quantized kernels are CPU only)"
        )));
    }
    Ok(x.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_amx;
    use crate::cpu_gemv::Tiles;
    use half::bf16;
    use rand::{Rng, SeedableRng};

    /// The bytes known before quantizing are the bytes a quantized matrix holds, in both
    /// formats, for odd and even row counts (Q4 rounds the whole matrix up to 64-byte lines).
    #[test]
    fn matrix_bytes_before_quantizing_equal_the_matrix() {
        for kind in [QuantKind::Q8, QuantKind::Q4] {
            for &(rows, cols) in &[(1, 64), (3, 64), (5, 128), (16, 192), (33, 4096)] {
                let w =
                    QuantMatrix::quantize(kind, &vec![0.25f32; rows * cols], rows, cols).unwrap();
                assert_eq!(
                    kind.matrix_bytes(rows, cols),
                    w.memory_bytes(),
                    "{} {rows}x{cols}",
                    kind.name()
                );
            }
        }
    }

    /// A check that `got`, row `r` and token `t` of a product, is within 1e-5 (relative to
    /// the sum of the terms' magnitudes) of the f64 sum of what bf16 products multiply.
    type Check<'a> = &'a dyn Fn(f32, usize, usize, &str);

    /// For both formats, each `[rows, cols]` of `shapes` and each token count: random weights
    /// and activations, and `f(w, x, tokens, check)` with `check` against the bf16-rounded
    /// dequantized weights times the bf16-rounded activations.
    fn on_bf16_rounded_operands(
        seed: u64,
        shapes: &[(usize, usize)],
        token_counts: &[usize],
        mut f: impl FnMut(&QuantMatrix, &[f32], usize, Check),
    ) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut rnd =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        for kind in [QuantKind::Q8, QuantKind::Q4] {
            for &(rows, cols) in shapes {
                let w = QuantMatrix::quantize(kind, &rnd(rows * cols), rows, cols).unwrap();
                let deq: Vec<f64> = w
                    .dequantize_f64()
                    .iter()
                    .map(|&v| bf16::from_f32(v as f32).to_f64())
                    .collect();
                for &tokens in token_counts {
                    let x = rnd(tokens * cols);
                    let xb: Vec<f64> = x.iter().map(|&v| bf16::from_f32(v).to_f64()).collect();
                    let what = format!("{} {rows}x{cols} tokens {tokens}", kind.name());
                    let check = |got: f32, r: usize, t: usize, path: &str| {
                        let terms = (0..cols).map(|c| deq[r * cols + c] * xb[t * cols + c]);
                        let (want, abs) = terms.fold((0.0, 0.0), |(s, a), v| (s + v, a + v.abs()));
                        assert!(
                            (got as f64 - want).abs() <= 1e-5 * (1.0 + abs),
                            "{path} {what} r{r} t{t}: {got} vs {want}"
                        );
                    };
                    f(&w, &x, tokens, &check);
                }
            }
        }
    }

    /// `y = x · wᵀ` through the format's gemv, every output checked.
    fn check_gemv(w: &QuantMatrix, x: &[f32], tokens: usize, check: Check) {
        let rows = w.rows();
        let mut y = vec![f32::NAN; tokens * rows];
        w.gemv(x, tokens, &mut y).unwrap();
        for t in 0..tokens {
            for r in 0..rows {
                check(y[t * rows + r], r, t, "gemv");
            }
        }
    }

    /// Quantized weights on the `vdpbf16ps` kernel (CPUs with AVX512-BF16; the path of 8+
    /// rows where AMX is missing), dequantized to bf16 row by row, in both formats: through
    /// the trait method directly, and where this CPU has no AMX through the format's gemv
    /// (which must pick it at 8+ tokens). A block dequantized into the wrong place, or a
    /// scale of the wrong block, misses the bound by far.
    #[test]
    fn bf16_dot_matches_f64_on_bf16_rounded_operands() {
        if !crate::cpu_bf16dot::enabled() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let shapes = [(1, 64), (3, 128), (17, 192), (40, 320)];
        on_bf16_rounded_operands(6, &shapes, &[1, 7, 8, 9, 16, 21], |w, x, tokens, check| {
            assert_eq!(with_matrix!(w, m => m.bf16_dot()), Tiles::RoundedInputs);
            let (rows, cols) = (w.rows(), w.cols());
            let p = crate::cpu_bf16dot::Pairs::new(x, tokens, cols);
            let r0 = rows / 3;
            let mut out = vec![f32::NAN; (rows - r0) * tokens];
            with_matrix!(w, m => m.dot_pairs_rows(r0, &p, &mut out));
            for r in 0..rows - r0 {
                for t in 0..tokens {
                    check(out[r * tokens + t], r0 + r, t, "dot_pairs_rows");
                }
            }
            if !cpu_amx::enabled() && tokens >= crate::cpu_bf16dot::min_tokens() {
                assert!(w.on_tiles(tokens), "the bf16 path is not taken");
                check_gemv(w, x, tokens, check);
            }
        });
    }

    /// Quantized weights on the AMX tiles (dequantized into the staging buffer in tile order)
    /// in both formats. Row counts of one, two, three and five row tiles (pairs and a single
    /// tail), widths of one and several blocks, token counts from 8 around the 16-token tile;
    /// through the format's gemv and straight through a block at a row offset. A wrongly
    /// laid-out stage sums the wrong weights and misses the bound by far.
    #[test]
    fn tiles_match_f64_on_bf16_rounded_operands() {
        if !cpu_amx::enabled() {
            eprintln!("skipped: this CPU or kernel has no AMX");
            return;
        }
        let shapes = [(16, 64), (32, 128), (48, 192), (80, 320)];
        on_bf16_rounded_operands(5, &shapes, &[8, 15, 16, 17, 33], |w, x, tokens, check| {
            assert_eq!(with_matrix!(w, m => m.tiles()), Tiles::RoundedInputs);
            let (rows, cols) = (w.rows(), w.cols());
            if tokens >= cpu_amx::min_tokens() {
                assert!(w.on_tiles(tokens));
                check_gemv(w, x, tokens, check);
            }
            let p = cpu_amx::Packed::new(x, tokens, cols);
            let (r0, n) = (rows - rows.min(32), rows.min(32));
            let mut out = vec![f32::NAN; n * p.padded()];
            with_matrix!(w, m => m.tile_block(r0, &p, &mut out));
            for r in 0..n {
                for t in 0..tokens {
                    check(out[r * p.padded() + t], r0 + r, t, "tile_block");
                }
            }
        });
    }
}
