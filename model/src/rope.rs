//! Rotary position embedding as Hugging Face applies it: the head dimension
//! is split in halves, `x·cos + rotate_half(x)·sin`, `rotate_half(x) = [-x₂, x₁]`.

use std::collections::HashMap;

use burn::tensor::{Device, Tensor, TensorData};

#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl Rope {
    /// `positions` is `[batch][len]`; the tables are `[batch, 1, len, head_dim]`.
    pub fn new(positions: &[Vec<usize>], head_dim: usize, base: f64, device: &Device) -> Self {
        let batch = positions.len();
        let len = positions.first().map_or(0, Vec::len);
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        // Rows mostly share positions: each distinct one is computed once.
        let mut first_row: HashMap<usize, usize> = HashMap::new();
        let mut cos = Vec::with_capacity(batch * len * head_dim);
        let mut sin = Vec::with_capacity(batch * len * head_dim);
        for &p in positions.iter().flatten() {
            if let Some(&at) = first_row.get(&p) {
                cos.extend_from_within(at..at + head_dim);
                sin.extend_from_within(at..at + head_dim);
                continue;
            }
            first_row.insert(p, cos.len());
            for j in 0..head_dim {
                // f32 product, as transformers computes the angle.
                let angle = (p as f32 * inv_freq[j % half] as f32) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let shape = [batch, 1, len, head_dim];
        Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }

    /// `x` is `[batch, heads, len, head_dim]`.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let x = match crate::kernels::rope::rope(x, &self.cos, &self.sin) {
            Ok(y) => return y,
            Err(x) => *x,
        };
        let [_, _, _, d] = x.dims();
        let half = d / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * self.cos.clone() + rotated * self.sin.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_halves_by_position() {
        let device = Device::default();
        let rope = Rope::new(&[vec![0, 1]], 4, 10_000.0, &device);
        let x = Tensor::<4>::from_data(
            TensorData::new(
                vec![1.0f32, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0],
                [1, 1, 2, 4],
            ),
            &device,
        );
        let y = rope.apply(x).into_data().try_into_vec::<f32>().unwrap();
        // position 0 is the identity
        assert_eq!(&y[..4], &[1.0, 2.0, 3.0, 4.0]);
        // position 1: pair (x0, x2) rotates by 1 rad, pair (x1, x3) by 0.01 rad
        let (c, s) = (1f32.cos(), 1f32.sin());
        let (c2, s2) = (0.01f32.cos(), 0.01f32.sin());
        let expected = [
            1.0 * c - 3.0 * s,
            2.0 * c2 - 4.0 * s2,
            3.0 * c + 1.0 * s,
            4.0 * c2 + 2.0 * s2,
        ];
        for (a, b) in y[4..].iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn rows_sharing_positions_get_each_rows_own_table() {
        let device = Device::default();
        let vec = |t: &Tensor<4>| t.clone().into_data().try_into_vec::<f32>().unwrap();
        let rows = [vec![0, 1, 2, 3], vec![3, 9, 0, 0]];
        let both = Rope::new(&rows, 8, 10_000.0, &device);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for row in &rows {
            let one = Rope::new(std::slice::from_ref(row), 8, 10_000.0, &device);
            cos.extend(vec(&one.cos));
            sin.extend(vec(&one.sin));
        }
        assert_eq!(vec(&both.cos), cos);
        assert_eq!(vec(&both.sin), sin);
        // position 9 is not position 3
        assert_ne!(cos[8 * 4..8 * 5], cos[8 * 5..8 * 6]);
    }
}
