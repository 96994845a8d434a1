//! `x·a + y·b` over two tensors of one shape in one pass on all cores:
//! WARP's EMA anchor update and its interpolation towards the init are this
//! sum over every parameter, which Burn's `flex` runs as three
//! single-threaded passes (two `mul_scalar` into new tensors, then `add`).
//! Each element is `x·(a as f32) + y·(b as f32)`, rounded as Burn's
//! `x.mul_scalar(a).add(y.mul_scalar(b))` rounds it.

use burn::backend::Flex;
use burn::tensor::Tensor;

use super::{GRAIN, f32s, multiversion};

multiversion! {
    fn chunk(x: &[f32], a: f32, y: &[f32], b: f32, out: &mut [f32]) {
        for ((out, &x), &y) in out.iter_mut().zip(x).zip(y) {
            *out = x * a + y * b;
        }
    }
}

/// `x·a + y·b` for contiguous f32 flex tensors of one shape; `Err` gives
/// the operands back elsewhere.
#[allow(clippy::type_complexity)]
pub fn weighted_sum<const D: usize>(
    x: Tensor<D>,
    a: f64,
    y: Tensor<D>,
    b: f64,
) -> Result<Tensor<D>, Box<(Tensor<D>, Tensor<D>)>> {
    let plain = super::enabled()
        .then(|| super::plain(&x).zip(super::plain(&y)))
        .flatten();
    let Some((tx, ty)) = plain.filter(|(tx, ty)| tx.layout().shape() == ty.layout().shape()) else {
        return Err(Box::new((x, y)));
    };
    let (Some(xs), Some(ys)) = (f32s(&tx), f32s(&ty)) else {
        return Err(Box::new((x, y)));
    };
    let (a, b) = (a as f32, b as f32);
    let ([out], _) = super::par_outputs([xs.len()], [GRAIN], |i, [out]| {
        chunk(
            super::chunk(xs, i, GRAIN),
            a,
            super::chunk(ys, i, GRAIN),
            b,
            out,
        )
    });
    Ok(Tensor::from_primitive::<Flex>(super::flex_tensor(
        out,
        &super::shape_of(&tx),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::random;

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().iter::<f32>().collect()
    }

    #[test]
    fn equals_burns_expression_bit_for_bit() {
        let (x, y) = (random([300, 170], 1.5, 4), random([300, 170], 0.2, 5));
        for (a, b) in [(0.99, 0.01), (0.7, 0.3), (1.0 - 0.01, 0.01)] {
            let want = values(x.clone().mul_scalar(a).add(y.clone().mul_scalar(b)));
            let got = weighted_sum(x.clone(), a, y.clone(), b).expect("contiguous flex tensors");
            assert_eq!(got.dims(), x.dims());
            assert_eq!(values(got), want);
        }
    }

    #[test]
    fn by_hand_and_handed_back() {
        let device = Default::default();
        let x = Tensor::<1>::from_data([1.0f32, -2.0, 0.0], &device);
        let y = Tensor::<1>::from_data([3.0f32, 2.0, 10.0], &device);
        // 0.75·1 + 0.25·3 = 1.5; 0.75·(−2) + 0.25·2 = −1; 0.25·10 = 2.5
        let got = weighted_sum(x.clone(), 0.75, y.clone(), 0.25).unwrap();
        assert_eq!(values(got), [1.5, -1.0, 2.5]);
        // shapes differ, or a strided view: handed back
        assert!(weighted_sum(x.narrow(0, 0, 2), 0.5, y, 0.5).is_err());
        let m = random([4, 6], 1.0, 1);
        assert!(weighted_sum(m.clone().transpose(), 0.5, m.transpose(), 0.5).is_err());
    }
}
