//! Checkpoint access: memory-mapped safetensors (one file or sharded through
//! `model.safetensors.index.json`), tensor-name aliases, and hf-hub resolution.
//!
//! Each tensor is copied out of the mapping once, and the mapped pages are then handed back to
//! the kernel (`madvise(MADV_DONTNEED)`; they stay in the page cache, not in this process), so
//! loading peaks at the size of the weights plus one tensor, not twice the weights.
//!
//! [`Weights`] is a small VarBuilder: `w.pp("self_attn").pp("q_proj").get(shape, "weight")`
//! walks the checkpoint by its own names, so layer code reads like the tensor list. Unlike
//! candle-nn's VarBuilder its errors are typed and name the tensor, the file, and what was
//! expected versus found.
//!
//! FP8 checkpoints (`quant_method: "fp8"` or compressed-tensors' `float-quantized`, see
//! [`crate::Quantization`]): a projection stored as `F8_E4M3` has its scales beside it, as
//! `<prefix>.weight_scale` or (block-wise, DeepSeek-V3 style) `<prefix>.weight_scale_inv`, and
//! with static activation scales an `<prefix>.input_scale`. [`Checkpoint::get`] dequantizes such
//! a tensor as it copies it out, `w[i, j] = f32(q[i, j]) × scale[i / bm, j / bn]` (one f32
//! rounding, as torch's `q.float() * scale`), then converts it to the compute dtype, so every
//! layer and kernel sees an ordinary f32/bf16 weight. The scale grid may be
//! - per tensor: shape `[]` or `[1]`;
//! - per output channel: `[rows]` or `[rows, 1]` (llm-compressor's `FP8_DYNAMIC`);
//! - per block: `[⌈rows / bm⌉, ⌈columns / bn⌉]`, the block from `weight_block_size` /
//!   `block_structure` ([`Checkpoint::with_weight_block`]); edge blocks may be partial, as vLLM
//!   allows;
//!
//! and for fused expert tensors `[E, rows, cols]` (`experts.gate_up_proj`, scales read from
//! `gate_up_proj_weight_scale`, `gate_up_proj.weight_scale`, `gate_up_proj_scale` or their
//! `_inv` forms) the same with a leading `[E]`, or one scale per expert (`[E]`, `[E, 1]`,
//! `[E, 1, 1]`). Scales may be f32, bf16 or f16 and must be finite and positive. This is
//! weight-only dequantization: `input_scale` is read and must be finite and positive, but
//! activations are not quantized, and the weights take the compute dtype's room in memory (FP8
//! compute is not implemented). Which tensors are quantized is read from the file's dtypes, so
//! `ignored_layers` need no handling here: those tensors are stored bf16.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorView};

use crate::ModelError;

/// Known renamings between checkpoint dialects: `(canonical fragment, alias fragment)`.
/// The canonical names are what transformers' `save_pretrained` writes for hy_v3; the aliases
/// are Tencent's original names (see transformers' `conversion_mapping.py`) and the names other
/// MoE families use for the same parameter.
const ALIASES: &[(&str, &str)] = &[
    ("mlp.gate.weight", "mlp.router.gate.weight"),
    ("mlp.e_score_correction_bias", "mlp.expert_bias"),
    ("mlp.e_score_correction_bias", "mlp.router.expert_bias"),
    (
        "mlp.e_score_correction_bias",
        "mlp.gate.e_score_correction_bias",
    ),
    ("mlp.shared_experts.", "mlp.shared_mlp."),
    ("mlp.shared_experts.", "mlp.shared_expert."),
];

/// An opened checkpoint: every safetensors file of a model folder, memory-mapped.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<PathBuf>,
    shards: Vec<Shard>,
    /// tensor name → index into `files` / `shards`.
    owner: HashMap<String, usize>,
    /// `[rows, columns]` per FP8 scale block, from `quantization_config` (see
    /// [`Checkpoint::with_weight_block`]).
    weight_block: Option<[usize; 2]>,
}

/// One mapped safetensors file and its parsed header.
struct Shard {
    mmap: Mmap,
    /// Byte offset of the tensor data (after the 8-byte length and the JSON header).
    data_start: usize,
    meta: Metadata,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files.len())
            .field("tensors", &self.owner.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens the safetensors files of `dir`: the shards listed by `model.safetensors.index.json`
    /// when present, else every `*.safetensors` file in the folder.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::Io {
                path: index.clone(),
                source: e,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Checkpoint {
                    path: index.clone(),
                    message: format!("invalid JSON: {e}"),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Checkpoint {
                    path: index.clone(),
                    message: "no \"weight_map\" object".into(),
                })?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|f| dir.join(f)).collect()
        } else {
            let rd = std::fs::read_dir(dir).map_err(|e| ModelError::Io {
                path: dir.to_path_buf(),
                source: e,
            })?;
            let mut v: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            v.sort();
            v
        };
        if files.is_empty() {
            return Err(ModelError::Checkpoint {
                path: dir.to_path_buf(),
                message: "no *.safetensors files found".into(),
            });
        }
        for f in &files {
            if !f.exists() {
                return Err(ModelError::Checkpoint {
                    path: f.clone(),
                    message: "shard listed in model.safetensors.index.json does not exist".into(),
                });
            }
        }
        // Map and parse each file on its own, so a corrupt or truncated file is named precisely.
        let mut owner = HashMap::new();
        let mut shards = Vec::with_capacity(files.len());
        for (i, f) in files.iter().enumerate() {
            let file = std::fs::File::open(f).map_err(|e| ModelError::Io {
                path: f.clone(),
                source: e,
            })?;
            // SAFETY: the file is mapped read-only; modifying a checkpoint while it is being
            // served is outside what any inference server supports.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::Io {
                path: f.clone(),
                source: e,
            })?;
            let (header, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
                ModelError::Checkpoint {
                    path: f.clone(),
                    message: format!("not a valid safetensors file (truncated or corrupt?): {e}"),
                }
            })?;
            for name in meta.tensors().into_keys() {
                owner.insert(name, i);
            }
            shards.push(Shard {
                mmap,
                data_start: 8 + header,
                meta,
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            shards,
            owner,
            weight_block: None,
        })
    }

    /// Sets the block of weights one FP8 scale covers ([`crate::Quantization::weight_block`]).
    /// Block-wise scales of matrices that are a whole number of blocks load without it (the
    /// block is the matrix over the scale grid); a matrix with partial edge blocks needs it.
    pub fn with_weight_block(mut self, block: Option<[usize; 2]>) -> Self {
        self.weight_block = block;
        self
    }

    /// The stored tensor `stored`: its shard, a view of its bytes in the mapping, and their offset.
    fn view(&self, stored: &str) -> Result<(usize, TensorView<'_>, usize), ModelError> {
        let i = *self
            .owner
            .get(stored)
            .ok_or_else(|| ModelError::MissingTensor {
                name: stored.to_string(),
                dir: self.dir.clone(),
            })?;
        let shard = &self.shards[i];
        let broken = |message: String| ModelError::Checkpoint {
            path: self.files[i].clone(),
            message,
        };
        let info = shard
            .meta
            .info(stored)
            .ok_or_else(|| broken(format!("tensor {stored} is not in the header")))?;
        let (a, b) = info.data_offsets;
        let start = shard.data_start + a;
        let bytes = shard
            .mmap
            .get(start..shard.data_start + b)
            .ok_or_else(|| broken(format!("tensor {stored} lies outside the file")))?;
        let view = TensorView::new(info.dtype, info.shape.clone(), bytes)
            .map_err(|e| broken(format!("tensor {stored}: {e}")))?;
        Ok((i, view, start))
    }

    /// Gives the mapped pages of `len` bytes at `offset` of shard `i` back to the kernel once
    /// they were copied (see the module docs). Failure only costs memory, so it is ignored.
    fn release(&self, i: usize, offset: usize, len: usize) {
        #[cfg(unix)]
        {
            use memmap2::UncheckedAdvice;
            // SAFETY: the mapping is private and read-only: dropped pages read back from the
            // file if touched again, so no reference into the mapping ever sees other bytes.
            let _ = unsafe {
                self.shards[i]
                    .mmap
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, offset, len)
            };
        }
        #[cfg(not(unix))]
        let _ = (i, offset, len);
    }

    /// The model folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor name in the checkpoint.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.owner.keys().map(String::as_str)
    }

    /// Resolves `name` or one of its aliases to the name stored in the checkpoint.
    pub fn resolve(&self, name: &str) -> Option<String> {
        if self.owner.contains_key(name) {
            return Some(name.to_string());
        }
        for (canon, alias) in ALIASES {
            if name.contains(canon) {
                let alt = name.replacen(canon, alias, 1);
                if self.owner.contains_key(&alt) {
                    return Some(alt);
                }
            }
        }
        None
    }

    /// Whether `name` (or an alias) is present.
    pub fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    fn file_of(&self, stored: &str) -> PathBuf {
        self.owner
            .get(stored)
            .map(|&i| self.files[i].clone())
            .unwrap_or_else(|| self.dir.clone())
    }

    /// The stored name `name` resolves to, or [`ModelError::MissingTensor`].
    fn stored(&self, name: &str) -> Result<String, ModelError> {
        self.resolve(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            dir: self.dir.clone(),
        })
    }

    /// Shape of a stored tensor (aliases allowed).
    pub fn shape_of(&self, name: &str) -> Result<Vec<usize>, ModelError> {
        let stored = self.stored(name)?;
        let (_, view, _) = self.view(&stored)?;
        Ok(view.shape().to_vec())
    }

    /// Loads a tensor by name (aliases allowed), checks its shape, and converts it to `dtype`.
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        let stored = self.stored(name)?;
        let file = self.file_of(&stored);
        let (shard, view, offset) = self.view(&stored)?;
        let st_dtype = view.dtype();
        use safetensors::Dtype as D;
        if st_dtype == D::F8_E4M3 {
            check_shape(&stored, &view, shape, &file)?;
            let w = self.dequantize(&stored, &file, &view, dtype)?;
            self.release(shard, offset, view.data().len());
            return Ok(w.to_device(device)?);
        }
        check_float(&stored, &view, &file)?;
        check_shape(&stored, &view, shape, &file)?;
        let t = candle_core::safetensors::Load::load(&view, device).map_err(|e| {
            ModelError::Checkpoint {
                path: file.clone(),
                message: format!("tensor {stored}: {e}"),
            }
        })?;
        self.release(shard, offset, view.data().len());
        Ok(t.to_dtype(dtype)?)
    }

    /// Loads `len` entries from `start` along `dim` of the tensor `name`, whose full shape must
    /// be `shape`: one rank's slice of a sharded weight ([`crate::parallel`]). Only the slice's
    /// bytes are copied out of the mapping (row by row when `dim > 0`), so a rank never holds
    /// the full tensor; FP8 tensors are the exception, dequantized whole and then narrowed
    /// (one tensor at a time).
    #[allow(clippy::too_many_arguments)]
    pub fn get_narrow(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        if dim >= shape.len() || start + len > shape[dim] {
            return Err(ModelError::InvalidInput(format!(
                "slice {start}..{} of dimension {dim} is outside tensor `{name}` of shape {shape:?}",
                start + len
            )));
        }
        if start == 0 && len == shape[dim] {
            return self.get(name, shape, dtype, device);
        }
        let stored = self.stored(name)?;
        let file = self.file_of(&stored);
        let (shard, view, offset) = self.view(&stored)?;
        use safetensors::Dtype as D;
        if view.dtype() == D::F8_E4M3 {
            let full = self.get(name, shape, dtype, device)?;
            return Ok(full.narrow(dim, start, len)?.contiguous()?);
        }
        check_float(&stored, &view, &file)?;
        check_shape(&stored, &view, shape, &file)?;
        let elem = view.dtype().bitsize() / 8;
        let outer: usize = shape[..dim].iter().product();
        let inner: usize = shape[dim + 1..].iter().product::<usize>() * elem;
        let row = shape[dim] * inner;
        let data = view.data();
        let mut bytes = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            let a = o * row + start * inner;
            bytes.extend_from_slice(&data[a..a + len * inner]);
        }
        let mut part = shape.to_vec();
        part[dim] = len;
        let broken = |e: String| ModelError::Checkpoint {
            path: file.clone(),
            message: format!("tensor {stored}: {e}"),
        };
        let sliced =
            TensorView::new(view.dtype(), part, &bytes).map_err(|e| broken(e.to_string()))?;
        let t = candle_core::safetensors::Load::load(&sliced, device)
            .map_err(|e| broken(e.to_string()))?;
        drop(bytes);
        self.release(shard, offset, view.data().len());
        Ok(t.to_dtype(dtype)?)
    }
}

/// [`ModelError::ShapeMismatch`] unless the stored tensor `stored` (in `file`) has `shape`.
fn check_shape(
    stored: &str,
    view: &TensorView<'_>,
    shape: &[usize],
    file: &Path,
) -> Result<(), ModelError> {
    if view.shape() != shape {
        return Err(ModelError::ShapeMismatch {
            name: stored.to_string(),
            expected: shape.to_vec(),
            found: view.shape().to_vec(),
            path: file.to_path_buf(),
        });
    }
    Ok(())
}

/// [`ModelError::UnsupportedDtype`] unless the stored tensor `stored` (in `file`) is f32, f16,
/// bf16 or f64 (what loads without dequantizing).
fn check_float(stored: &str, view: &TensorView<'_>, file: &Path) -> Result<(), ModelError> {
    use safetensors::Dtype as D;
    if !matches!(view.dtype(), D::F32 | D::F16 | D::BF16 | D::F64) {
        return Err(ModelError::UnsupportedDtype {
            name: stored.to_string(),
            dtype: format!("{:?}", view.dtype()),
            path: file.to_path_buf(),
        });
    }
    Ok(())
}

/// Where the scales of an FP8 tensor may be stored, in the order they are looked for: beside
/// `X.weight` as `X.weight_scale`; beside a fused parameter `X` (no `.weight` suffix) as
/// `X_weight_scale`, `X.weight_scale` or `X_scale`. `kind` is `weight` or `input`; weight
/// scales may also carry DeepSeek-V3's `_inv` suffix (`X.weight_scale_inv`, `X_scale_inv`),
/// which despite the name also multiplies.
fn scale_names(stored: &str, kind: &str) -> Vec<String> {
    let mut v = match stored.strip_suffix(".weight") {
        Some(prefix) => vec![format!("{prefix}.{kind}_scale")],
        None => {
            let mut v = vec![
                format!("{stored}_{kind}_scale"),
                format!("{stored}.{kind}_scale"),
            ];
            if kind == "weight" {
                v.push(format!("{stored}_scale"));
            }
            v
        }
    };
    if kind == "weight" {
        let inv: Vec<String> = v.iter().map(|n| format!("{n}_inv")).collect();
        v.extend(inv);
    }
    v
}

/// An FP8 tensor's scales laid out as a grid over its `[lead.., rows, cols]` weights: `lead`
/// grids (one per expert, or one shared) of `rows × cols` scales, each covering a `bm × bn`
/// block (edge blocks partial).
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleGrid {
    /// The scales, row-major `[lead, rows, cols]`.
    pub values: Vec<f32>,
    /// Grids stored: 1 (shared by every leading index) or one per leading index.
    pub lead: usize,
    /// Scale rows and columns per grid.
    pub rows: usize,
    /// Scale columns per grid.
    pub cols: usize,
    /// Weight rows one scale covers.
    pub bm: usize,
    /// Weight columns one scale covers.
    pub bn: usize,
}

impl ScaleGrid {
    /// Lays out `values` stored with shape `scale_shape` over weights of shape `weight_shape`
    /// (2-D, or 3-D with a leading expert dimension), taking the block from the grid when the
    /// matrix divides evenly and from `block` (the config's) otherwise. The error says which
    /// shapes would have been accepted.
    pub fn new(
        values: Vec<f32>,
        scale_shape: &[usize],
        weight_shape: &[usize],
        block: Option<[usize; 2]>,
    ) -> Result<Self, String> {
        let (lead, r, c) = match *weight_shape {
            [r, c] => (1, r, c),
            [e, r, c] => (e, r, c),
            _ => return Err(format!("has FP8 weights of shape {weight_shape:?}; only matrices (and stacks of them) are quantized")),
        };
        let n = values.len();
        let dims = scale_shape;
        let (g_lead, sr, sc) = if n == 1 {
            (1, 1, 1)
        } else if lead > 1 && n == lead && dims[0] == lead {
            (lead, 1, 1) // one per expert: [E], [E, 1], [E, 1, 1]
        } else {
            let w_rank = weight_shape.len();
            match (w_rank, dims) {
                (2, [sr]) => (1, *sr, 1),
                (2, [sr, sc]) => (1, *sr, *sc),
                (3, [e, sr]) if *e == lead => (lead, *sr, 1),
                (3, [e, sr, sc]) if *e == lead => (lead, *sr, *sc),
                _ => (0, 0, 0),
            }
        };
        let accepted = || {
            let grid = match block {
                Some([bm, bn]) => format!(
                    "[{}, {}] for blocks of {bm}x{bn}",
                    r.div_ceil(bm),
                    c.div_ceil(bn)
                ),
                None => "[rows/bm, cols/bn] for blocks bm x bn".into(),
            };
            let e = if lead > 1 {
                format!("{lead}, ")
            } else {
                String::new()
            };
            format!(
                "per tensor ([] or [1]){}, per output channel ([{e}{r}] or [{e}{r}, 1]) or per block ([{e}{grid}])",
                if lead > 1 { format!(", per expert ([{lead}])") } else { String::new() }
            )
        };
        if g_lead == 0 || sr == 0 || sc == 0 || sr > r || sc > c {
            return Err(format!("of shape {scale_shape:?} does not fit weights of shape {weight_shape:?}; accepted: {}", accepted()));
        }
        // Weights per scale along one side: all of them, one each, the configured block (a
        // configured block is binding for a proper grid), or the even division.
        let side = |n: usize, s: usize, b: Option<usize>| -> Option<usize> {
            match b {
                _ if s == 1 => Some(n),
                _ if s == n => Some(1),
                Some(b) => (n.div_ceil(b) == s).then_some(b),
                None => n.is_multiple_of(s).then_some(n / s),
            }
        };
        let (Some(bm), Some(bn)) = (
            side(r, sr, block.map(|b| b[0])),
            side(c, sc, block.map(|b| b[1])),
        ) else {
            return Err(format!(
                "of shape {scale_shape:?} does not divide weights of shape {weight_shape:?} into \
                 blocks{}; accepted: {}",
                match block {
                    Some(b) => format!(" of {}x{} (quantization_config's block)", b[0], b[1]),
                    None =>
                        " (set weight_block_size in quantization_config for partial edge blocks)"
                            .into(),
                },
                accepted()
            ));
        };
        Ok(Self {
            values,
            lead: g_lead,
            rows: sr,
            cols: sc,
            bm,
            bn,
        })
    }

    /// `f32(q) × scale` for the matrix `index` of the stack (`q` row-major `[rows, cols]`).
    pub fn dequantize(&self, index: usize, q: &[f32], cols: usize) -> Vec<f32> {
        let g = if self.lead == 1 { 0 } else { index };
        let grid = &self.values[g * self.rows * self.cols..(g + 1) * self.rows * self.cols];
        let mut out = Vec::with_capacity(q.len());
        for (i, row) in q.chunks_exact(cols).enumerate() {
            let s = &grid[(i / self.bm) * self.cols..][..self.cols];
            out.extend(row.iter().enumerate().map(|(j, &x)| x * s[j / self.bn]));
        }
        out
    }
}

impl Checkpoint {
    /// Dequantizes the `F8_E4M3` tensor `stored` into `dtype` on the CPU (see the module docs).
    /// 3-D (fused expert) tensors go one expert at a time, so the f32 intermediate never holds
    /// more than one expert.
    fn dequantize(
        &self,
        stored: &str,
        file: &Path,
        view: &TensorView<'_>,
        dtype: DType,
    ) -> Result<Tensor, ModelError> {
        let shape = view.shape().to_vec();
        let err = |message: String| ModelError::Quantization {
            name: stored.to_string(),
            path: file.to_path_buf(),
            message,
        };
        let names = scale_names(stored, "weight");
        let Some(scale_name) = names.iter().find(|n| self.owner.contains_key(*n)) else {
            return Err(err(format!(
                "is float8 e4m3 but has no weight scale (looked for {})",
                names.join(", ")
            )));
        };
        let (values, scale_shape) = self.scale_values(scale_name, &err)?;
        let grid = ScaleGrid::new(values, &scale_shape, &shape, self.weight_block)
            .map_err(|m| err(format!("has a scale {scale_name} {m}")))?;
        if let Some(input) = scale_names(stored, "input")
            .into_iter()
            .find(|n| self.owner.contains_key(n))
        {
            let (v, input_shape) = self.scale_values(&input, &err)?;
            let experts = if shape.len() == 3 { shape[0] } else { 1 };
            if v.len() != 1 && v.len() != experts {
                return Err(err(format!(
                    "has an input scale {input} of shape {input_shape:?}; only per-tensor ([] or \
                     [1]){} input scales are supported",
                    if experts > 1 {
                        format!(" or per-expert ([{experts}])")
                    } else {
                        String::new()
                    }
                )));
            }
        }
        let q = candle_core::safetensors::Load::load(view, &Device::Cpu)
            .map_err(|e| err(format!("cannot be read: {e}")))?;
        let (rows, cols) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        let one = |q: &Tensor, index: usize| -> Result<Tensor, ModelError> {
            let x = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let w = grid.dequantize(index, &x, cols);
            Ok(Tensor::from_vec(w, (rows, cols), &Device::Cpu)?.to_dtype(dtype)?)
        };
        if shape.len() != 3 {
            return one(&q, 0);
        }
        let mut parts = Vec::with_capacity(shape[0]);
        for j in 0..shape[0] {
            parts.push(one(&q.get(j)?, j)?);
        }
        Ok(Tensor::stack(&parts, 0)?)
    }

    /// Reads the scale tensor `name` as f32 values with its stored shape; each must be finite
    /// and positive.
    fn scale_values(
        &self,
        name: &str,
        err: &dyn Fn(String) -> ModelError,
    ) -> Result<(Vec<f32>, Vec<usize>), ModelError> {
        let (_, view, _) = self.view(name)?;
        use safetensors::Dtype as D;
        if !matches!(view.dtype(), D::F32 | D::BF16 | D::F16 | D::F64) {
            return Err(err(format!(
                "has a scale {name} of dtype {:?}; scales must be floating point",
                view.dtype()
            )));
        }
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
            .map_err(|e| err(format!("has a scale {name} that cannot be read: {e}")))?;
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bad) = v.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
            return Err(err(format!(
                "has a scale {name} holding {bad}; scales must be finite and greater than zero"
            )));
        }
        Ok((v, view.shape().to_vec()))
    }
}

/// A position inside a checkpoint (prefix + dtype + device), VarBuilder-style.
#[derive(Clone)]
pub struct Weights {
    ckpt: Arc<Checkpoint>,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl Weights {
    /// The root of a checkpoint, loading tensors as `dtype` onto `device`.
    pub fn new(ckpt: Arc<Checkpoint>, dtype: DType, device: Device) -> Self {
        Self {
            ckpt,
            prefix: String::new(),
            dtype,
            device,
        }
    }

    /// Descends into a sub-module (`pp` as in candle-nn).
    pub fn pp(&self, part: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            part.to_string()
        } else {
            format!("{}.{part}", self.prefix)
        };
        Self {
            prefix,
            ..self.clone()
        }
    }

    /// Full tensor name for `name` under this prefix.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Loads `name` with the given shape in this builder's dtype.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor, ModelError> {
        self.ckpt
            .get(&self.path(name), shape, self.dtype, &self.device)
    }

    /// Loads entries `start..start + len` along `dim` of `name` (full shape `shape`) in this
    /// builder's dtype: a rank's slice ([`Checkpoint::get_narrow`]).
    pub fn get_narrow(
        &self,
        shape: &[usize],
        name: &str,
        dim: usize,
        start: usize,
        len: usize,
    ) -> Result<Tensor, ModelError> {
        self.ckpt.get_narrow(
            &self.path(name),
            shape,
            dim,
            start,
            len,
            self.dtype,
            &self.device,
        )
    }

    /// Loads `name` in f32 regardless of the compute dtype (router weights, expert bias).
    pub fn get_f32(&self, shape: &[usize], name: &str) -> Result<Tensor, ModelError> {
        self.ckpt
            .get(&self.path(name), shape, DType::F32, &self.device)
    }

    /// Whether `name` exists under this prefix (aliases included).
    pub fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(&self.path(name))
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors land on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The checkpoint.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.ckpt
    }
}

/// Files a model folder needs besides weights; fetched from the hub when resolving an id.
const HUB_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];

/// Finds the `config.json` of `spec` without touching weights: a folder's file, a path to a JSON
/// file, or a hub id's config from the hf-hub cache (downloaded alone when missing unless
/// `HF_HUB_OFFLINE=1`). What `switchyard plan` reads.
pub fn resolve_config(spec: &str, revision: Option<&str>) -> Result<PathBuf, ModelError> {
    let p = Path::new(spec);
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    if p.is_dir() {
        let cfg = p.join("config.json");
        if !cfg.is_file() {
            return Err(ModelError::ModelNotFound {
                spec: spec.to_string(),
                message: "the folder has no config.json".into(),
            });
        }
        return Ok(cfg);
    }
    check_hub_id(spec)?;
    let rev = revision.unwrap_or("main");
    let (cache, repo) = cached_repo(spec, rev);
    if let Some(cfg) = repo.get("config.json") {
        return Ok(cfg);
    }
    check_online_allowed(spec, rev, &cache)?;
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .build()
        .map_err(|e| ModelError::ModelNotFound {
            spec: spec.to_string(),
            message: format!("hf-hub client: {e}"),
        })?;
    api.repo(hf_hub::Repo::with_revision(
        spec.to_string(),
        hf_hub::RepoType::Model,
        rev.to_string(),
    ))
    .get("config.json")
    .map_err(|e| ModelError::ModelNotFound {
        spec: spec.to_string(),
        message: format!("download config.json: {e}"),
    })
}

/// Checks that `spec` has the form of a hub id `owner/name`.
fn check_hub_id(spec: &str) -> Result<(), ModelError> {
    let looks_like_id = spec.split('/').count() == 2
        && !spec.starts_with('.')
        && !spec.starts_with('/')
        && spec.split('/').all(|s| !s.is_empty());
    if looks_like_id {
        Ok(())
    } else {
        Err(ModelError::ModelNotFound {
            spec: spec.to_string(),
            message: "no such folder, and not a hub id of the form owner/name".into(),
        })
    }
}

/// The hf-hub cache's view of `spec` at `rev`.
fn cached_repo(spec: &str, rev: &str) -> (hf_hub::Cache, hf_hub::CacheRepo) {
    let cache = hf_hub::Cache::from_env();
    let repo = cache.repo(hf_hub::Repo::with_revision(
        spec.to_string(),
        hf_hub::RepoType::Model,
        rev.to_string(),
    ));
    (cache, repo)
}

/// Refuses to go online when `HF_HUB_OFFLINE` is set and `spec` is not cached.
fn check_online_allowed(spec: &str, rev: &str, cache: &hf_hub::Cache) -> Result<(), ModelError> {
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true") {
        return Err(ModelError::ModelNotFound {
            spec: spec.to_string(),
            message: format!(
                "revision {rev} is not in the hf-hub cache at {} and HF_HUB_OFFLINE is set",
                cache.path().display()
            ),
        });
    }
    Ok(())
}

/// Resolves `--model`: a local folder, or a hub id `owner/name` looked up in the hf-hub cache
/// (`HF_HOME`, default `~/.cache/huggingface`) and downloaded when missing unless
/// `HF_HUB_OFFLINE=1`. Returns the folder holding the files.
pub fn resolve_model(spec: &str, revision: Option<&str>) -> Result<PathBuf, ModelError> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    check_hub_id(spec)?;
    let rev = revision.unwrap_or("main");
    let (cache, repo) = cached_repo(spec, rev);
    if let Some(cfg) = repo.get("config.json") {
        let dir = cfg.parent().map(Path::to_path_buf).unwrap_or_default();
        if repo.get("model.safetensors.index.json").is_some()
            || repo.get("model.safetensors").is_some()
        {
            return Ok(dir);
        }
    }
    check_online_allowed(spec, rev, &cache)?;
    download(spec, rev)
}

fn download(spec: &str, rev: &str) -> Result<PathBuf, ModelError> {
    let err = |m: String| ModelError::ModelNotFound {
        spec: spec.to_string(),
        message: m,
    };
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| err(format!("hf-hub client: {e}")))?;
    let repo = api.repo(hf_hub::Repo::with_revision(
        spec.to_string(),
        hf_hub::RepoType::Model,
        rev.to_string(),
    ));
    let cfg = repo
        .get("config.json")
        .map_err(|e| err(format!("download config.json: {e}")))?;
    for f in HUB_FILES.iter().skip(1) {
        let _ = repo.get(f); // optional files
    }
    match repo.get("model.safetensors.index.json") {
        Ok(idx) => {
            let text = std::fs::read_to_string(&idx).map_err(|e| err(e.to_string()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| err(format!("index: {e}")))?;
            let mut shards: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                repo.get(&s)
                    .map_err(|e| err(format!("download {s}: {e}")))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")
                .map_err(|e| err(format!("download model.safetensors: {e}")))?;
        }
    }
    Ok(cfg.parent().map(Path::to_path_buf).unwrap_or_default())
}
