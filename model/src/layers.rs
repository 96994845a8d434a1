//! The small building blocks of Gemma 2. Every weight keeps the Hugging Face
//! name and layout (`Linear` is `[out, in]`), so checkpoints need no remapping.

use burn::module::{Module, Param};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::{ModelError, Result};
use crate::init::{Init, ParamSource};
use crate::lora::Factor;
use crate::quant::SharedQuant;
use crate::skinny_matmul::matmul_transposed;

pub(crate) const INIT_STD: f64 = 0.02;

/// The largest buffer `device` binds to one kernel, where it has such a
/// limit: a wgpu device binds at most `max_storage_buffer_binding_size`
/// (2 GiB − 4 on the drivers seen), and CubeCL panics beyond it.
pub fn max_binding_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "wgpu")]
    if let burn::backend::DispatchDevice::Cube(cube) = device.as_dispatch().clone().inner() {
        return Some(cube.client().properties().memory.max_page_size);
    }
    let _ = device;
    None
}

/// Refuses an f32 parameter of `shape` larger than `limit` bytes, before
/// anything of it is read or allocated.
pub(crate) fn fits_device(name: &str, shape: &[usize], limit: Option<u64>) -> Result<()> {
    let bytes = 4 * shape.iter().map(|&d| d as u64).product::<u64>();
    match limit {
        Some(limit) if bytes > limit => Err(ModelError::OverDeviceLimit {
            tensor: name.to_string(),
            shape: shape.to_vec(),
            bytes,
            limit,
        }),
        _ => Ok(()),
    }
}

pub(crate) fn param<const D: usize>(
    source: &mut dyn ParamSource,
    name: &str,
    shape: [usize; D],
    init: Init,
    device: &Device,
) -> Result<Param<Tensor<D>>> {
    fits_device(name, &shape, max_binding_bytes(device))?;
    let t = source.tensor(name, &shape, init)?;
    // a reward model's head stays f32 beside a quantized trunk
    let head = name == "score.weight" && source.quantize().is_some();
    if D == 2 && source.compact() && !head {
        // one matrix at a time in f32, kept in bf16
        let t = Tensor::<D>::from_data(TensorData::new(t.data, shape), device);
        return Ok(Param::from_tensor(t.cast(burn::tensor::DType::BF16)));
    }
    Ok(Param::from_data(TensorData::new(t.data, shape), device))
}

/// `x·Wᵀ`, plus `(α/r)·(x·Aᵀ)·Bᵀ` when LoRA factors are attached (see
/// [`crate::lora`]).
#[derive(Module, Debug)]
pub struct Linear {
    /// `[out, in]`; an empty `[0, in]` when the frozen weight is held in
    /// `quantized` instead.
    pub weight: Param<Tensor<2>>,
    /// The frozen weight in 8 or 4 bits ([`crate::quant`]).
    #[module(skip)]
    pub quantized: Option<SharedQuant>,
    pub lora_a: Option<Factor>,
    pub lora_b: Option<Factor>,
    pub lora_scale: f64,
    /// Dropout on the factors' input while training.
    pub lora_dropout: f64,
}

impl Linear {
    pub(crate) fn new(
        source: &mut dyn ParamSource,
        name: &str,
        d_in: usize,
        d_out: usize,
        device: &Device,
    ) -> Result<Self> {
        let name = format!("{name}.weight");
        let init = Init::Normal { std: INIT_STD };
        if let Some(format) = source.quantize() {
            // block by block from the file, kept in 8 or 4 bits
            let q = source.quantized(&name, [d_out, d_in], format, init)?;
            let empty =
                Tensor::<2>::from_data(TensorData::new(Vec::<f32>::new(), [0, d_in]), device);
            return Ok(Self {
                quantized: Some(std::sync::Arc::new(q)),
                ..Self::from_weight(Param::from_tensor(empty))
            });
        }
        let weight = param(source, &name, [d_out, d_in], init, device)?;
        Ok(Self::from_weight(weight))
    }

    pub(crate) fn from_weight(weight: Param<Tensor<2>>) -> Self {
        Self {
            weight,
            quantized: None,
            lora_a: None,
            lora_b: None,
            lora_scale: 0.0,
            lora_dropout: 0.0,
        }
    }

    /// `[out, in]` of the weight, wherever it is held.
    pub fn dims(&self) -> [usize; 2] {
        match &self.quantized {
            Some(q) => q.dims(),
            None => self.weight.dims(),
        }
    }

    /// [`Linear::forward`] of each layer on the same `x`; plain layers (no
    /// LoRA factors) share one product call (see
    /// [`crate::skinny_matmul::matmul_transposed_each`]).
    pub fn forward_each<const D: usize, const N: usize>(
        x: Tensor<D>,
        layers: [&Linear; N],
    ) -> [Tensor<D>; N] {
        let quantized = layers.iter().filter(|l| l.quantized.is_some()).count();
        if layers
            .iter()
            .any(|l| l.lora_a.is_some() || l.lora_b.is_some())
            || (quantized != 0 && quantized != N)
        {
            return layers.map(|l| l.forward(x.clone()));
        }
        let dims = x.dims();
        let d_in = dims[D - 1];
        let rows: usize = dims[..D - 1].iter().product();
        let x = x.reshape([rows, d_in]);
        let ys = if quantized == N {
            crate::quantized_linear::quantized_linear_each(
                x,
                layers.map(|l| l.quantized.as_ref().expect("counted")),
            )
        } else {
            crate::skinny_matmul::matmul_transposed_each(x, layers.map(|l| l.weight.val()))
        };
        ys.map(|y| {
            let mut out = dims;
            out[D - 1] = y.dims()[1];
            y.reshape(out)
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        let d_in = dims[D - 1];
        let rows: usize = dims[..D - 1].iter().product();
        let x = x.reshape([rows, d_in]);
        let mut y = match &self.quantized {
            Some(q) => crate::quantized_linear::quantized_linear(x.clone(), q),
            None => matmul_transposed(x.clone(), self.weight.val()),
        };
        if let (Some(a), Some(b)) = (&self.lora_a, &self.lora_b) {
            let x = if self.lora_dropout > 0.0 && x.is_autodiff() {
                let keep = 1.0 - self.lora_dropout;
                let mask = Tensor::<2>::random(
                    x.dims(),
                    burn::tensor::Distribution::Bernoulli(keep),
                    &x.device(),
                );
                x * mask.div_scalar(keep)
            } else {
                x
            };
            let low = matmul_transposed(x, a.weight.val());
            y = y + matmul_transposed(low, b.weight.val()).mul_scalar(self.lora_scale);
        }
        let mut out = dims;
        out[D - 1] = y.dims()[1];
        y.reshape(out)
    }
}

#[derive(Module, Debug)]
pub struct Embedding {
    pub weight: Param<Tensor<2>>,
}

impl Embedding {
    pub(crate) fn new(
        source: &mut dyn ParamSource,
        name: &str,
        vocab: usize,
        hidden: usize,
        device: &Device,
    ) -> Result<Self> {
        let weight = param(
            source,
            &format!("{name}.weight"),
            [vocab, hidden],
            Init::Normal { std: INIT_STD },
            device,
        )?;
        Ok(Self { weight })
    }

    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let x = burn::tensor::module::embedding(self.weight.val(), ids);
        if x.dtype() == burn::tensor::DType::F32 {
            x
        } else {
            x.cast(burn::tensor::DType::F32)
        }
    }
}

/// Gemma's RMSNorm: `x / sqrt(mean(x²) + eps) · (1 + w)`.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl RmsNorm {
    pub(crate) fn new(
        source: &mut dyn ParamSource,
        name: &str,
        hidden: usize,
        eps: f64,
        device: &Device,
    ) -> Result<Self> {
        let weight = param(
            source,
            &format!("{name}.weight"),
            [hidden],
            Init::Zeros,
            device,
        )?;
        Ok(Self { weight, eps })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let x = match crate::kernels::rms_norm::rms_norm(x, self.weight.val(), self.eps) {
            Ok(y) => return y,
            Err(back) => back.0,
        };
        let rms = x
            .clone()
            .square()
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt()
            .recip();
        let scale = self.weight.val().add_scalar(1.0).unsqueeze::<D>();
        x * rms * scale
    }
}

/// `down(gelu_tanh(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub(crate) fn new(
        source: &mut dyn ParamSource,
        name: &str,
        hidden: usize,
        intermediate: usize,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            gate_proj: Linear::new(
                source,
                &format!("{name}.gate_proj"),
                hidden,
                intermediate,
                device,
            )?,
            up_proj: Linear::new(
                source,
                &format!("{name}.up_proj"),
                hidden,
                intermediate,
                device,
            )?,
            down_proj: Linear::new(
                source,
                &format!("{name}.down_proj"),
                intermediate,
                hidden,
                device,
            )?,
        })
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [gate, up] = Linear::forward_each(x, [&self.gate_proj, &self.up_proj]);
        let hidden = crate::kernels::geglu::geglu(gate, up).unwrap_or_else(|back| {
            let [gate, up] = *back;
            gelu_tanh(gate) * up
        });
        self.down_proj.forward(hidden)
    }
}

/// Largest exponent passed to `exp`: `e^80` is finite in f32, and beyond it
/// both rewritten functions below are flat to f32 precision. Without the
/// clamp `e^v` overflows to `inf` and the backward pass computes `0 · inf`.
const MAX_EXPONENT: f64 = 80.0;

/// `gelu_pytorch_tanh(x) = ½x(1 + tanh(u))`, `u = √(2/π)(x + 0.044715x³)`,
/// written as `x / (1 + e^{−2u})` (the same function): `exp` is much cheaper
/// than `tanh` and `powf` on the CPU backend.
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    const TWO_SQRT_2_OVER_PI: f64 = 2.0 * 0.797_884_560_802_865_4;
    let u = x.clone().square().mul_scalar(0.044715).add_scalar(1.0) * x.clone();
    x / u
        .mul_scalar(-TWO_SQRT_2_OVER_PI)
        .clamp_max(MAX_EXPONENT)
        .exp()
        .add_scalar(1.0)
}

/// `cap · tanh(x / cap)`, written as `cap − 2·cap / (e^{2x/cap} + 1)`.
pub fn soft_cap<const D: usize>(x: Tensor<D>, cap: Option<f64>) -> Tensor<D> {
    let x = match cap.map(|cap| crate::kernels::log_softmax::soft_cap(x.clone(), cap)) {
        Some(Ok(y)) => return y,
        _ => x,
    };
    soft_cap_unfused(x, cap)
}

/// [`soft_cap`] in Burn's element-wise ops (other backends; the fused
/// kernel's reference).
pub(crate) fn soft_cap_unfused<const D: usize>(x: Tensor<D>, cap: Option<f64>) -> Tensor<D> {
    match cap {
        Some(cap) => x
            .mul_scalar(2.0 / cap)
            .clamp_max(MAX_EXPONENT)
            .exp()
            .add_scalar(1.0)
            .recip()
            .mul_scalar(-2.0 * cap)
            .add_scalar(cap),
        None => x,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parameter_over_the_binding_limit_is_refused() {
        // wgpu's limit on the drivers seen; a Gemma-2 2B's embedding is 256000 × 2304 × 4 B
        let limit = Some(2_147_483_644);
        let err = fits_device("model.embed_tokens.weight", &[256_000, 2304], limit).unwrap_err();
        assert!(matches!(
            err,
            ModelError::OverDeviceLimit {
                bytes: 2_359_296_000,
                limit: 2_147_483_644,
                ..
            }
        ));
        let line = err.to_string();
        assert!(
            line.starts_with(
                "tensor model.embed_tokens.weight: [256000, 2304] in f32 is 2359296000 bytes"
            ),
            "{line}"
        );
        // a 9B's largest projection (gate: 14336 × 3584) fits, and so does exactly the limit
        fits_device("mlp.gate_proj.weight", &[14_336, 3584], limit).unwrap();
        fits_device("w", &[536_870_911], limit).unwrap();
        assert!(fits_device("w", &[536_870_912], limit).is_err());
        // no limit: the CPU
        fits_device("model.embed_tokens.weight", &[256_000, 2304], None).unwrap();
        assert_eq!(max_binding_bytes(&Device::flex()), None);
    }

    /// Values and gradients of `f` at `xs` (sum of outputs as the loss).
    fn value_and_grad(f: fn(Tensor<1>) -> Tensor<1>, xs: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let device = Device::default();
        let x = Tensor::<1>::from_data(TensorData::new(xs.to_vec(), [xs.len()]), &device)
            .autodiff()
            .require_grad();
        let y = f(x.clone());
        let grads = y.clone().sum().backward();
        let grad = x.grad(&grads).expect("gradient of x");
        let vec = |t: Tensor<1>| t.into_data().try_into_vec::<f32>().unwrap();
        (vec(y.inner()), vec(grad))
    }

    #[test]
    fn gelu_and_soft_cap_have_finite_gradients_at_large_inputs() {
        // gelu: e^{−2u} overflows f32 below x ≈ −10.7
        let (y, g) = value_and_grad(gelu_tanh, &[-1e4, -50.0, -11.0, 0.0, 11.0, 50.0]);
        assert!(y.iter().chain(&g).all(|v| v.is_finite()), "{y:?} {g:?}");
        assert_eq!(&y[3..], &[0.0, 11.0, 50.0]);
        assert!(
            y[..3].iter().chain(&g[..3]).all(|v| v.abs() < 1e-20),
            "{y:?} {g:?}"
        );
        assert_eq!(&g[3..], &[0.5, 1.0, 1.0]);
        // soft-cap 30: e^{2x/30} overflows above x ≈ 1331
        let (y, g) = value_and_grad(
            |x| soft_cap(x, Some(30.0)),
            &[-1e5, -2000.0, 0.0, 2000.0, 1e5],
        );
        assert!(y.iter().chain(&g).all(|v| v.is_finite()), "{y:?} {g:?}");
        assert_eq!(y, [-30.0, -30.0, 0.0, 30.0, 30.0]);
        assert_eq!([g[0], g[1], g[3], g[4]], [0.0; 4]);
        assert!((g[2] - 1.0).abs() < 1e-6, "{g:?}");
    }

    #[test]
    fn gelu_tanh_matches_the_tanh_form() {
        let device = Device::default();
        let xs: Vec<f32> = (-60..=60).map(|i| i as f32 * 0.25).collect();
        let x = Tensor::<1>::from_data(TensorData::new(xs.clone(), [xs.len()]), &device);
        let got = gelu_tanh(x).into_data().try_into_vec::<f32>().unwrap();
        for (x, y) in xs.iter().zip(got) {
            let u = 0.797_884_6 * (x + 0.044715 * x * x * x);
            let want = 0.5 * x * (1.0 + u.tanh());
            assert!(
                (y - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{x}: {y} vs {want}"
            );
        }
    }
}
