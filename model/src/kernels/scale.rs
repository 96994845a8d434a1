//! `g · s` over a gradient, on all cores, for clipping by the global norm:
//! in the gradient's own memory order, so a transposed gradient stays
//! transposed instead of going through Burn's strided element loop. Each
//! element is `g · (s as f32)`, as Burn's `mul_scalar` rounds it.

use burn::backend::Flex;
use burn::tensor::Tensor;

use super::{GRAIN, dense_f32s, multiversion};

multiversion! {
    fn chunk(x: &[f32], s: f32, y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x * s;
        }
    }
}

/// `x · s` for a plain f32 flex tensor that fills its storage densely
/// (contiguous or permuted); `Err` gives it back elsewhere.
pub fn scale<const D: usize>(x: Tensor<D>, s: f64) -> Result<Tensor<D>, Box<Tensor<D>>> {
    let Some(t) = super::enabled().then(|| super::plain(&x)).flatten() else {
        return Err(Box::new(x));
    };
    let Some(values) = dense_f32s(&t) else {
        return Err(Box::new(x));
    };
    drop(x);
    let s = s as f32;
    let ([out], _) = super::par_outputs([values.len()], [GRAIN], |i, [y]| {
        chunk(super::chunk(values, i, GRAIN), s, y)
    });
    // the same strides over a buffer that starts at the first element
    let shape = super::shape_of(&t);
    Ok(Tensor::from_primitive::<Flex>(super::laid_out(
        out,
        &shape,
        t.layout().strides(),
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
    fn equals_burns_mul_scalar_bit_for_bit_on_transposed_tensors() {
        let x = random([300, 170], 1.5, 4);
        for t in [x.clone(), x.clone().transpose()] {
            let want = values(t.clone().mul_scalar(0.37));
            let got = scale(t.clone(), 0.37).expect("dense flex tensor");
            assert_eq!(got.dims(), t.dims());
            assert_eq!(values(got), want);
        }
        // by hand
        let small = Tensor::<1>::from_data([2.0f32, -4.0], &Default::default());
        assert_eq!(values(scale(small, 0.5).unwrap()), [1.0, -2.0]);
        // gaps in the storage: handed back
        assert!(scale(x.narrow(0, 0, 7).transpose().narrow(0, 1, 3), 2.0).is_err());
    }
}
