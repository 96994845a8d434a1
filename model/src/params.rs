//! Parameters by their Hugging Face names: read them out of a module (to
//! save, or for weight-space algebra on the device), write them back, and
//! gradients by the same names. One visitor reads, one mapper writes.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Gradients, Tensor, TensorData};

use crate::safetensors_io::HostTensor;

/// One parameter on the device, flattened, with its shape.
#[derive(Debug, Clone)]
pub struct ParamTensor {
    pub shape: Vec<usize>,
    pub value: Tensor<1>,
}

impl ParamTensor {
    pub fn from_host(t: &HostTensor, device: &Device) -> Self {
        let value = Tensor::from_data(TensorData::new(t.data.clone(), [t.data.len()]), device);
        Self {
            shape: t.shape.clone(),
            value,
        }
    }

    pub fn to_host(&self) -> HostTensor {
        HostTensor {
            shape: self.shape.clone(),
            data: self
                .value
                .clone()
                .into_data()
                .try_into_vec_as::<f32>()
                .expect("float tensor"),
        }
    }

    /// The same shape with another value.
    pub fn with(&self, value: Tensor<1>) -> Self {
        Self {
            shape: self.shape.clone(),
            value,
        }
    }
}

/// Parameters by name, on the device and outside any autodiff graph.
pub type ParamMap = BTreeMap<String, ParamTensor>;

/// Every float parameter (or its gradient) with its path, id and value,
/// flattened and outside the autodiff graph.
struct Walk<'g, F> {
    path: Vec<String>,
    grads: Option<&'g Gradients>,
    only_trainable: bool,
    seen: F,
}

impl<F: FnMut(String, ParamId, ParamTensor)> ModuleVisitor for Walk<'_, F> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.only_trainable && !param.is_require_grad() {
            return;
        }
        let value = match self.grads {
            None => Some(param.val()),
            Some(grads) => param.val().grad(grads),
        };
        if let Some(t) = value {
            let t = t.inner();
            let shape = t.dims().to_vec();
            let value = t.reshape([shape.iter().product::<usize>()]);
            (self.seen)(self.path.join("."), param.id, ParamTensor { shape, value });
        }
    }
}

fn walk<M: Module>(
    module: &M,
    grads: Option<&Gradients>,
    seen: impl FnMut(String, ParamId, ParamTensor),
) {
    module.visit(&mut Walk {
        path: Vec::new(),
        grads,
        only_trainable: false,
        seen,
    });
}

/// Every float parameter, keyed by its path (= Hugging Face name).
pub fn named_params<M: Module>(module: &M) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    walk(module, None, |name, _, p| {
        out.insert(name, p.to_host());
    });
    out
}

/// The parameters that take gradients (all but a LoRA run's frozen base),
/// by name.
pub fn trainable_params<M: Module>(module: &M) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    module.visit(&mut Walk {
        path: Vec::new(),
        grads: None,
        only_trainable: true,
        seen: |name, _, p: ParamTensor| {
            out.insert(name, p.to_host());
        },
    });
    out
}

/// The parameters that take gradients, on the device (no host copy).
pub fn trainable_param_map<M: Module>(module: &M) -> ParamMap {
    let mut out = ParamMap::new();
    module.visit(&mut Walk {
        path: Vec::new(),
        grads: None,
        only_trainable: true,
        seen: |name, _, p| {
            out.insert(name, p);
        },
    });
    out
}

/// Every float parameter's shape, by name.
pub fn param_shapes<M: Module>(module: &M) -> BTreeMap<String, Vec<usize>> {
    let mut out = BTreeMap::new();
    walk(module, None, |name, _, p| {
        out.insert(name, p.shape);
    });
    out
}

/// The device of a module's first float parameter (the default device for
/// a module without any).
pub fn device_of<M: Module>(module: &M) -> Device {
    module.devices().into_iter().next().unwrap_or_default()
}

/// Gradients of every parameter that has one, by name.
pub fn named_grads<M: Module>(module: &M, grads: &Gradients) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    walk(module, Some(grads), |name, _, p| {
        out.insert(name, p.to_host());
    });
    out
}

/// Every float parameter of `module` on its device (no host copy).
pub fn param_map<M: Module>(module: &M) -> ParamMap {
    let mut out = ParamMap::new();
    walk(module, None, |name, _, p| {
        out.insert(name, p);
    });
    out
}

/// The optimizer-state key (`ParamId`) of every float parameter, by name.
pub fn param_ids<M: Module>(module: &M) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    walk(module, None, |name, id, _| {
        out.insert(name, id.val());
    });
    out
}

/// Writes named values and/or ids into a module's parameters.
struct Replace<'a> {
    path: Vec<String>,
    values: Option<&'a ParamMap>,
    ids: Option<&'a BTreeMap<String, u64>>,
}

impl ModuleMapper for Replace<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.join(".");
        let param = match self.values.and_then(|v| v.get(&name)) {
            Some(new) => param.map(|old| {
                let dims = old.dims();
                assert_eq!(new.shape, dims, "parameter {name}: shape");
                let value = new.value.clone().reshape(dims);
                if old.is_autodiff() {
                    crate::on_autodiff(value, &old.device()).set_require_grad(old.is_require_grad())
                } else {
                    value
                }
            }),
            None => param,
        };
        match self.ids.and_then(|ids| ids.get(&name)) {
            Some(&id) => {
                let (_, value, mapper) = param.consume();
                Param::from_mapped_value(ParamId::from(id), value, mapper)
            }
            None => param,
        }
    }
}

/// `module` with every parameter named in `params` replaced by its value
/// (shapes must match; parameters not named keep theirs).
pub fn with_params<M: Module>(module: M, params: &ParamMap) -> M {
    module.map(&mut Replace {
        path: Vec::new(),
        values: Some(params),
        ids: None,
    })
}

/// `module` with the parameter ids of an earlier run, so that optimizer
/// state saved then applies to the parameters loaded now.
pub fn with_param_ids<M: Module>(module: M, ids: &BTreeMap<String, u64>) -> M {
    module.map(&mut Replace {
        path: Vec::new(),
        values: None,
        ids: Some(ids),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Gemma2Config, Gemma2ForCausalLM, RandomInit};

    #[test]
    fn param_map_round_trips_through_with_params() {
        let device = Device::default();
        let c = Gemma2Config::new(16, 8, 16, 2, 2, 1, 4, 4);
        let a = Gemma2ForCausalLM::new(&c, &mut RandomInit::new(1), &device).unwrap();
        let b = Gemma2ForCausalLM::new(&c, &mut RandomInit::new(2), &device).unwrap();
        let moved = with_params(b, &param_map(&a));
        assert_eq!(named_params(&moved), named_params(&a));
        let host = named_params(&a);
        for (name, p) in param_map(&a) {
            assert_eq!(p.to_host(), host[&name], "{name}");
        }
    }
}
