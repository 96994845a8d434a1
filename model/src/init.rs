//! Where a model's parameters come from: a checkpoint (names and shapes
//! checked against the config) or a seeded initialisation as `transformers`
//! does it (normal(0, 0.02) for matrices, zeros for the `(1 + w)` norms).

use std::collections::BTreeSet;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

use crate::error::{ModelError, Result};
use crate::quant::{QuantFormat, QuantMatrix};
use crate::safetensors_io::{HostTensor, Weights};

#[derive(Debug, Clone, Copy)]
pub enum Init {
    Normal { std: f64 },
    Zeros,
}

pub trait ParamSource {
    /// The tensor called `name` (Hugging Face name and layout).
    fn tensor(&mut self, name: &str, shape: &[usize], init: Init) -> Result<HostTensor>;

    /// Whether matrices are kept in bf16 once read (frozen models only:
    /// see [`crate::checkpoint::load_causal_lm_compact`]).
    fn compact(&self) -> bool {
        false
    }

    /// The format the seven projections are held in, when quantized
    /// (frozen models only: see [`crate::quant`]).
    fn quantize(&self) -> Option<QuantFormat> {
        None
    }

    /// The matrix called `name`, quantized.
    fn quantized(
        &mut self,
        name: &str,
        shape: [usize; 2],
        format: QuantFormat,
        init: Init,
    ) -> Result<QuantMatrix> {
        let t = self.tensor(name, &shape, init)?;
        Ok(QuantMatrix::quantize(format, &t.data, shape))
    }
}

pub struct RandomInit {
    rng: StdRng,
}

impl RandomInit {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }
}

impl ParamSource for RandomInit {
    fn tensor(&mut self, _name: &str, shape: &[usize], init: Init) -> Result<HostTensor> {
        let n = shape.iter().product();
        let data = match init {
            Init::Zeros => vec![0.0; n],
            Init::Normal { std } => {
                let normal = Normal::new(0.0, std as f32).expect("positive std");
                (0..n).map(|_| normal.sample(&mut self.rng)).collect()
            }
        };
        Ok(HostTensor {
            shape: shape.to_vec(),
            data,
        })
    }
}

/// Reads parameters from a checkpoint and remembers which it used, so that
/// tensors the config does not explain are reported.
pub struct CheckpointSource<'a> {
    weights: &'a Weights,
    used: BTreeSet<String>,
    /// Keep matrices in bf16 (see [`ParamSource::compact`]).
    pub compact: bool,
    /// Quantize the projections (see [`ParamSource::quantize`]).
    pub quantize: Option<QuantFormat>,
}

/// Tensors a checkpoint may carry beyond the model being built: the untied
/// copy of the LM head, and the reward head when a reward checkpoint is read
/// as a causal LM.
const TOLERATED_EXTRAS: [&str; 2] = ["lm_head.weight", "score.weight"];

impl<'a> CheckpointSource<'a> {
    pub fn new(weights: &'a Weights) -> Self {
        Self {
            weights,
            used: BTreeSet::new(),
            compact: false,
            quantize: None,
        }
    }

    pub fn finish(self) -> Result<()> {
        for name in self.weights.names() {
            if !self.used.contains(name) && !TOLERATED_EXTRAS.contains(&name) {
                return Err(ModelError::UnexpectedTensor {
                    dir: self.weights.dir().to_path_buf(),
                    tensor: name.to_string(),
                });
            }
        }
        Ok(())
    }
}

impl ParamSource for CheckpointSource<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize], _init: Init) -> Result<HostTensor> {
        self.check(name, shape)?;
        self.weights.read(name)
    }

    fn quantized(
        &mut self,
        name: &str,
        shape: [usize; 2],
        format: QuantFormat,
        _init: Init,
    ) -> Result<QuantMatrix> {
        self.check(name, &shape)?;
        self.weights.read_quantized(name, format, shape)
    }

    fn compact(&self) -> bool {
        self.compact
    }

    fn quantize(&self) -> Option<QuantFormat> {
        self.quantize
    }
}

impl CheckpointSource<'_> {
    /// `name` is stored with `shape`; it counts as used.
    fn check(&mut self, name: &str, shape: &[usize]) -> Result<()> {
        let Some((_, stored)) = self.weights.info(name) else {
            return Err(ModelError::MissingTensor {
                dir: self.weights.dir().to_path_buf(),
                tensor: name.to_string(),
            });
        };
        if stored != shape {
            return Err(ModelError::Tensor {
                path: self.weights.path_of(name).expect("known").to_path_buf(),
                tensor: name.to_string(),
                reason: format!("shape {stored:?}, but config.json implies {shape:?}"),
            });
        }
        self.used.insert(name.to_string());
        Ok(())
    }
}

/// A checkpoint's parameters, with the reward head drawn at random when the
/// checkpoint has none (a reward model started from a causal LM).
pub struct NewHead<'a> {
    pub checkpoint: CheckpointSource<'a>,
    pub head: RandomInit,
}

impl ParamSource for NewHead<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize], init: Init) -> Result<HostTensor> {
        if name == "score.weight" && self.checkpoint.weights.info(name).is_none() {
            return self.head.tensor(name, shape, init);
        }
        self.checkpoint.tensor(name, shape, init)
    }

    fn compact(&self) -> bool {
        self.checkpoint.compact
    }

    fn quantize(&self) -> Option<QuantFormat> {
        self.checkpoint.quantize
    }

    fn quantized(
        &mut self,
        name: &str,
        shape: [usize; 2],
        format: QuantFormat,
        init: Init,
    ) -> Result<QuantMatrix> {
        self.checkpoint.quantized(name, shape, format, init)
    }
}
