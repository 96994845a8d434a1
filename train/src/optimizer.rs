//! AdamW with the warmup + cosine schedule, global-norm clipping and gradient
//! accumulation: call [`Optimizer::backward`] once per micro-batch, then
//! [`Optimizer::step`]. Each micro-batch loss is divided by the number of
//! micro-batches, so `accumulation` micro-batches of `n` rows give the same
//! gradient as one batch of `accumulation·n` rows with equal token counts.

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::Tensor;

use crate::state::StateError;
use crate::{clip_global_norm, warmup_cosine};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimConfig {
    /// Optimizer steps of the whole run (the schedule's length).
    pub steps: usize,
    pub lr: f64,
    pub warmup: usize,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Global L2 norm to clip to; 0 turns clipping off.
    pub clip: f64,
    /// Micro-batches per optimizer step.
    pub accumulation: usize,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Seconds spent summing the gradients over the ranks (0 in one process).
    pub all_reduce_s: f64,
}

pub struct Optimizer<M> {
    adamw: ModuleOptimizer,
    grads: GradientsAccumulator<M>,
    pending: usize,
    cfg: OptimConfig,
}

fn adamw(cfg: &OptimConfig) -> ModuleOptimizer {
    ModuleOptimizer::from(crate::adamw::FusedAdamW::new(
        cfg.beta1 as f32,
        cfg.beta2 as f32,
        1e-8,
        cfg.weight_decay as f32,
    ))
}

impl<M: Module> Optimizer<M> {
    pub fn new(cfg: &OptimConfig) -> Self {
        Self {
            adamw: adamw(cfg),
            grads: GradientsAccumulator::new(),
            pending: 0,
            cfg: cfg.clone(),
        }
    }

    /// Back-propagates one micro-batch's loss (scaled by 1/accumulation).
    pub fn backward(&mut self, model: &M, loss: Tensor<1>) {
        let scale = 1.0 / self.cfg.accumulation.max(1) as f64;
        let grads = GradientsParams::from_grads(loss.mul_scalar(scale).backward(), model);
        self.grads.accumulate(model, grads);
        self.pending += 1;
    }

    /// Clips the accumulated gradients and applies AdamW at step `step`'s
    /// learning rate (0-based).
    pub fn step(&mut self, step: usize, model: M) -> (M, StepStats) {
        let mut grads = self.grads.grads();
        self.pending = 0;
        let start = std::time::Instant::now();
        if posttrain_dist::world().size() > 1 {
            crate::all_reduce::sum_over_ranks(&model, &mut grads, posttrain_dist::world());
        }
        let all_reduce_s = start.elapsed().as_secs_f64();
        let grad_norm = clip_global_norm(&model, &mut grads, self.cfg.clip);
        let c = &self.cfg;
        let lr = warmup_cosine(step, c.steps, c.warmup, c.lr, c.min_lr_ratio);
        (
            self.adamw.step(lr, model, grads),
            StepStats {
                lr,
                grad_norm,
                all_reduce_s,
            },
        )
    }

    /// Writes the AdamW moments and step counts (keyed by parameter id;
    /// see `posttrain_model::params::param_ids`) to `path`.
    pub fn save_state(&self, path: &std::path::Path) -> Result<(), StateError> {
        self.adamw
            .to_record()
            .save(path)
            .map_err(|e| StateError::File {
                path: path.to_path_buf(),
                reason: format!("{e:?}"),
            })
    }

    /// Reads what [`Optimizer::save_state`] wrote.
    pub fn load_state(&mut self, path: &std::path::Path) -> Result<(), StateError> {
        let record = burn::optim::OptimizerRecord::load(path).map_err(|e| StateError::File {
            path: path.to_path_buf(),
            reason: format!("not a readable optimizer state, truncated or corrupt ({e})"),
        })?;
        let fresh = adamw(&self.cfg);
        self.adamw = std::mem::replace(&mut self.adamw, fresh).load_record(record);
        Ok(())
    }

    /// Micro-batches back-propagated since the last step.
    pub fn pending(&self) -> usize {
        self.pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::tensor::{Device, TensorData};

    #[derive(Module, Debug)]
    struct Lin {
        w: Param<Tensor<1>>,
    }

    fn cfg(accumulation: usize) -> OptimConfig {
        OptimConfig {
            steps: 10,
            lr: 0.1,
            warmup: 0,
            min_lr_ratio: 1.0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.95,
            clip: 0.0,
            accumulation,
        }
    }

    fn loss(m: &Lin, x: &[f32]) -> Tensor<1> {
        let device = m.w.val().device();
        let x = Tensor::<1>::from_data(TensorData::new(x.to_vec(), [x.len()]), &device);
        (m.w.val() * x).sum().square()
    }

    fn weights(m: &Lin) -> Vec<f32> {
        m.w.val().into_data().try_into_vec::<f32>().unwrap()
    }

    #[test]
    fn two_half_batches_equal_one_full_batch() {
        let device = Device::default().autodiff();
        let init = || Lin {
            w: Param::from_data(TensorData::new(vec![0.5f32, -0.25], [2]), &device),
        };
        let (a, b) = ([1.0f32, 2.0], [-3.0f32, 0.5]);
        let mut full = Optimizer::new(&cfg(1));
        let m = init();
        let both = loss(&m, &a).add(loss(&m, &b)).div_scalar(2.0);
        full.backward(&m, both);
        let (full_model, s1) = full.step(0, m);

        let mut acc = Optimizer::new(&cfg(2));
        let m = init();
        acc.backward(&m, loss(&m, &a));
        acc.backward(&m, loss(&m, &b));
        assert_eq!(acc.pending(), 2);
        let (acc_model, s2) = acc.step(0, m);
        assert_eq!(acc.pending(), 0);
        assert!((s1.grad_norm - s2.grad_norm).abs() < 1e-6);
        for (x, y) in weights(&full_model).iter().zip(weights(&acc_model)) {
            assert!((x - y).abs() < 1e-7, "{x} vs {y}");
        }
        assert_ne!(weights(&full_model), weights(&init()));
    }
}
