//! `Σ x²` of a tensor on all cores, for the global gradient norm: each
//! chunk of 16k elements sums in f32 lanes, the chunks add in f64 in order
//! (so the result does not depend on the thread count).

use burn::tensor::Tensor;
use rayon::prelude::*;

use super::{GRAIN, dense_f32s, multiversion, sum_pairs};

multiversion! {
    fn chunk(x: &[f32], out: &mut f64) {
        *out = f64::from(sum_pairs(x, x, |a, b| a * b));
    }
}

/// `Σ x²` in f64 for an f32 tensor on flex (autodiff or not) that fills its
/// storage densely (contiguous or permuted, as a transposed gradient is),
/// summed in memory order; `None` elsewhere.
pub fn sum_of_squares<const D: usize>(x: &Tensor<D>) -> Option<f64> {
    if !super::enabled() {
        return None;
    }
    let t = super::plain(&x.clone().inner())?;
    let values = dense_f32s(&t)?;
    let parts: Vec<f64> = values
        .par_chunks(GRAIN)
        .map(|c| {
            let mut s = 0.0;
            chunk(c, &mut s);
            s
        })
        .collect();
    Some(parts.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::random;

    #[test]
    fn matches_burn_and_a_hand_sum() {
        let x = random([3, 20001], 2.0, 9);
        let got = sum_of_squares(&x).unwrap();
        let want: f64 = x
            .clone()
            .into_data()
            .iter::<f32>()
            .map(|v| f64::from(v) * f64::from(v))
            .sum();
        assert!((got - want).abs() <= 1e-5 * want, "{got} vs {want}");
        let burn = x.clone().square().sum().into_scalar::<f64>();
        assert!((got - burn).abs() <= 1e-4 * want, "{got} vs {burn}");
        let small = burn::tensor::Tensor::<1>::from_data([3.0f32, 4.0], &Default::default());
        assert_eq!(sum_of_squares(&small), Some(25.0));
        // a transposed view (how a linear weight's gradient comes back)
        let t = x.clone().transpose();
        assert!(!super::super::plain(&t).unwrap().is_contiguous());
        let got_t = sum_of_squares(&t).expect("a permuted dense tensor is summed");
        assert_eq!(got_t, got, "the same memory, the same order");
        // a strided slice leaves gaps in its storage: not summed here
        assert_eq!(sum_of_squares(&x.clone().narrow(1, 0, 100)), None);
    }
}
