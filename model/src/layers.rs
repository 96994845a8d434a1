//! The small building blocks of Gemma 2. Every weight keeps the Hugging Face
//! name and layout (`Linear` is `[out, in]`), so checkpoints need no remapping.

use burn::module::{Module, Param};
use burn::tensor::activation::gelu_approximate;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::Result;
use crate::init::{Init, ParamSource};

pub(crate) const INIT_STD: f64 = 0.02;

pub(crate) fn param<const D: usize>(
    source: &mut dyn ParamSource,
    name: &str,
    shape: [usize; D],
    init: Init,
    device: &Device,
) -> Result<Param<Tensor<D>>> {
    let t = source.tensor(name, &shape, init)?;
    Ok(Param::from_data(TensorData::new(t.data, shape), device))
}

#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
}

impl Linear {
    pub(crate) fn new(
        source: &mut dyn ParamSource,
        name: &str,
        d_in: usize,
        d_out: usize,
        device: &Device,
    ) -> Result<Self> {
        let weight = param(
            source,
            &format!("{name}.weight"),
            [d_out, d_in],
            Init::Normal { std: INIT_STD },
            device,
        )?;
        Ok(Self { weight })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        let d_in = dims[D - 1];
        let rows: usize = dims[..D - 1].iter().product();
        let y = x
            .reshape([rows, d_in])
            .matmul(self.weight.val().transpose());
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
        burn::tensor::module::embedding(self.weight.val(), ids)
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
        let gate = gelu_approximate(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}

/// `cap · tanh(x / cap)`.
pub fn soft_cap<const D: usize>(x: Tensor<D>, cap: Option<f64>) -> Tensor<D> {
    match cap {
        Some(cap) => x.div_scalar(cap).tanh().mul_scalar(cap),
        None => x,
    }
}
