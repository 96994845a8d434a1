//! The gradient sum over the ranks of a data-parallel run: every trainable
//! parameter's gradient (zeros where this rank has none) in one flat host
//! buffer, followed by one presence count per parameter, summed by
//! [`Dist::sum_f32`]. A parameter gets a gradient on every rank when any
//! rank had one, so all ranks take the same optimizer step.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

use posttrain_dist::Dist;

struct Slot {
    id: ParamId,
    shape: Vec<usize>,
    device: Device,
}

struct Gather<'a> {
    grads: &'a GradientsParams,
    slots: Vec<Slot>,
    flat: Vec<f32>,
    present: Vec<f32>,
}

impl ModuleVisitor for Gather<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !param.is_require_grad() {
            return;
        }
        // the device of gradients: the parameter's, outside autodiff
        let value = param.val().inner();
        let (shape, device) = (value.dims().to_vec(), value.device());
        match self.grads.get::<D>(param.id) {
            Some(g) => {
                let data = g.into_data().convert::<f32>();
                self.flat
                    .extend_from_slice(data.as_slice::<f32>().expect("f32 gradient"));
                self.present.push(1.0);
            }
            None => {
                let n: usize = shape.iter().product();
                self.flat.resize(self.flat.len() + n, 0.0);
                self.present.push(0.0);
            }
        }
        self.slots.push(Slot {
            id: param.id,
            shape,
            device,
        });
    }
}

/// Replaces `grads` by their sum over the ranks of `dist`.
pub fn sum_over_ranks<M: Module>(model: &M, grads: &mut GradientsParams, dist: &Dist) {
    let mut g = Gather {
        grads,
        slots: Vec::new(),
        flat: Vec::new(),
        present: Vec::new(),
    };
    model.visit(&mut g);
    let Gather {
        slots,
        mut flat,
        present,
        ..
    } = g;
    let values = flat.len();
    flat.extend(present);
    dist.sum_f32(&mut flat);
    let (values, present) = flat.split_at(values);
    let mut at = 0;
    for (slot, &count) in slots.iter().zip(present) {
        let n: usize = slot.shape.iter().product();
        if count > 0.0 {
            register(grads, slot, &values[at..at + n]);
        }
        at += n;
    }
}

fn register(grads: &mut GradientsParams, slot: &Slot, values: &[f32]) {
    let data = TensorData::new(values.to_vec(), slot.shape.clone());
    macro_rules! rank {
        ($($d:literal)*) => {
            match slot.shape.len() {
                $($d => {
                    grads.remove::<$d>(slot.id);
                    grads.register(slot.id, Tensor::<$d>::from_data(data, &slot.device));
                })*
                r => panic!("a parameter of rank {r}"),
            }
        };
    }
    rank!(1 2 3 4 5 6);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Module, Debug)]
    struct Two {
        a: Param<Tensor<1>>,
        b: Param<Tensor<2>>,
    }

    #[test]
    fn one_rank_sum_keeps_gradients_and_their_absence() {
        let device = Device::default().autodiff();
        let m = Two {
            a: Param::from_data(TensorData::new(vec![1f32, 2.0], [2]), &device),
            b: Param::from_data(TensorData::new(vec![0f32; 4], [2, 2]), &device),
        };
        let loss = m.a.val().mul_scalar(3.0).sum();
        let mut grads = GradientsParams::from_grads(loss.backward(), &m);
        sum_over_ranks(&m, &mut grads, posttrain_dist::world());
        let a = grads.get::<1>(m.a.id).unwrap().into_data();
        assert_eq!(a.try_to_vec::<f32>().unwrap(), vec![3.0, 3.0]);
        assert!(grads.get::<2>(m.b.id).is_none(), "no rank had one");
    }
}
