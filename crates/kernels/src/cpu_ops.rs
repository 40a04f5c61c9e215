//! Element-wise ops on CPU bf16 tensors that the forward pass runs between its matrix
//! products: the residual adds. candle's bf16 `add` converts eight values per (not inlined)
//! intrinsic call and hands the loop to its own spinning thread pool; on the 2-core dev VM
//! the two residual adds per layer took ~12% of a long prefill of the `small` preset.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::KernelError;

/// Values per parallel task: 256 KiB of each operand, far more than a task switch costs.
const CHUNK: usize = 128 * 1024;

/// `x + y` for two contiguous bf16 CPU tensors of one shape, rounded as candle's bf16 `add`
/// rounds (each sum in f32, then to nearest even); `None` when that does not apply.
pub fn add_bf16(x: &Tensor, y: &Tensor) -> Result<Option<Tensor>, KernelError> {
    if !x.device().is_cpu() || x.dtype() != DType::BF16 || y.dtype() != DType::BF16 {
        return Ok(None);
    }
    if x.shape() != y.shape() {
        return Ok(None);
    }
    let sum = {
        let (sx, lx) = x.storage_and_layout();
        let (sy, ly) = y.storage_and_layout();
        let (Some((a0, a1)), Some((b0, b1))) = (lx.contiguous_offsets(), ly.contiguous_offsets())
        else {
            return Ok(None);
        };
        let (Storage::Cpu(CpuStorage::BF16(a)), Storage::Cpu(CpuStorage::BF16(b))) = (&*sx, &*sy)
        else {
            return Ok(None);
        };
        let (a, b) = (&a[a0..a1], &b[b0..b1]);
        let mut out = vec![bf16::ZERO; a.len()];
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| {
                for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                    *o = bf16::from_f32(a.to_f32() + b.to_f32());
                }
            });
        out
    };
    Ok(Some(Tensor::from_vec(sum, x.shape(), x.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Bit-identical to candle's bf16 add, contiguous or not (the fallback), and refused for
    /// other dtypes.
    #[test]
    fn matches_candle_add() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (300, 1000), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let y = Tensor::randn(0f32, 1.0, (300, 1000), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let bits = |t: &Tensor| -> Vec<u16> {
            let v = t.flatten_all().unwrap().to_vec1::<bf16>().unwrap();
            v.iter().map(|b| b.to_bits()).collect()
        };
        let want = (&x + &y).unwrap();
        let got = add_bf16(&x, &y).unwrap().unwrap();
        assert_eq!(bits(&got), bits(&want));
        assert!(add_bf16(&x.t().unwrap(), &y.t().unwrap())
            .unwrap()
            .is_none());
        let xf = x.to_dtype(DType::F32).unwrap();
        assert!(add_bf16(&xf, &y).unwrap().is_none());
    }
}
