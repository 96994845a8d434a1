//! Helpers for the kernels' tests: each fused kernel against Burn's
//! unfused expression, forward and gradient.

use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};

/// Seeded normal values with standard deviation `std`.
pub(crate) fn random<const D: usize>(shape: [usize; D], std: f32, seed: u64) -> Tensor<D> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let dist = rand_distr::Normal::new(0.0f32, std).unwrap();
    let v: Vec<f32> = (0..n).map(|_| rng.sample(dist)).collect();
    Tensor::from_data(TensorData::new(v, shape), &Device::default())
}

/// `f`'s output and the gradients of `Σ f(x)·w` (a fixed random `w`) with
/// respect to each operand, as flat vectors.
pub(crate) fn value_and_grads<const N: usize, const D: usize, const E: usize>(
    operands: [Tensor<D>; N],
    f: impl Fn([Tensor<D>; N]) -> Tensor<E>,
) -> Vec<Vec<f32>> {
    let xs = operands.map(|t| t.autodiff().require_grad());
    let y = f(xs.clone());
    let n: usize = y.dims().iter().product();
    let w: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 13) as f32 / 6.0 - 1.0)
        .collect();
    let w = Tensor::<E>::from_data(TensorData::new(w, y.dims()), &Device::default());
    let grads = (y.clone() * w.autodiff()).sum().backward();
    let flat = |t: Tensor<D>| t.into_data().iter::<f32>().collect::<Vec<_>>();
    let mut out = vec![y.inner().into_data().iter::<f32>().collect()];
    for x in xs {
        out.push(x.grad(&grads).map(flat).unwrap_or_default());
    }
    out
}

/// Every element of `a` within `tol·(1 + |b|)` of `b`'s.
pub(crate) fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (k, (a, b)) in a.iter().zip(b).enumerate() {
        assert_eq!(a.len(), b.len(), "output {k}: lengths");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "output {k}, element {i}: {x} vs {y}"
            );
        }
    }
}
