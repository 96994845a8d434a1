//! Gradient clipping by the global norm over all parameters,
//! `g ← g · min(1, max_norm / ‖g‖₂)` (Burn's own clipping works per tensor).

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    total: f64,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.total += posttrain_model::kernels::sum_squares::sum_of_squares(&g)
                .unwrap_or_else(|| g.square().sum().into_scalar::<f64>());
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            let g = posttrain_model::kernels::scale::scale(g, self.factor)
                .unwrap_or_else(|g| g.mul_scalar(self.factor));
            self.grads.register(param.id, g);
        }
    }
}

/// Clips in place and returns the norm before clipping.
pub fn clip_global_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let mut norm = SquaredNorm { grads, total: 0.0 };
    module.visit(&mut norm);
    let norm = norm.total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        module.visit(&mut Scale {
            grads,
            factor: max_norm / norm,
        });
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[derive(Module, Debug)]
    struct Two {
        a: Param<Tensor<1>>,
        b: Param<Tensor<2>>,
    }

    #[test]
    fn clips_by_the_norm_over_all_tensors() {
        let device = Device::default().autodiff();
        let m = Two {
            a: Param::from_data(TensorData::new(vec![0f32, 0.0], [2]), &device),
            b: Param::from_data(TensorData::new(vec![0f32; 2], [1, 2]), &device),
        };
        // loss = 3·a₀ + 4·b₀₁ → gradient (3, 0 | 0, 4), global norm 5
        let loss = m.a.val().narrow(0, 0, 1).mul_scalar(3.0).sum()
            + m.b.val().narrow(1, 1, 1).mul_scalar(4.0).sum();
        let mut grads = GradientsParams::from_grads(loss.backward(), &m);
        let norm = clip_global_norm(&m, &mut grads, 1.0);
        assert!((norm - 5.0).abs() < 1e-6);
        let a = grads
            .get::<1>(m.a.id)
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let b = grads
            .get::<2>(m.b.id)
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        assert!(
            (a[0] - 0.6).abs() < 1e-6 && (b[1] - 0.8).abs() < 1e-6,
            "{a:?} {b:?}"
        );
        let again = clip_global_norm(&m, &mut grads, 10.0);
        assert!((again - 1.0).abs() < 1e-6, "under the bound: unchanged");
    }
}
