//! Parameters by their Hugging Face names: read them out of a module (to
//! save, or for weight-space algebra on the device), write them back, and
//! gradients by the same names.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Gradients, Tensor, TensorData};

use crate::safetensors_io::HostTensor;

struct Collect<'g> {
    path: Vec<String>,
    grads: Option<&'g Gradients>,
    out: BTreeMap<String, HostTensor>,
}

fn to_host<const D: usize>(t: Tensor<D>) -> HostTensor {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("float tensor");
    HostTensor { shape, data }
}

impl ModuleVisitor for Collect<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = match self.grads {
            None => Some(param.val()),
            Some(grads) => param.val().grad(grads),
        };
        if let Some(t) = value {
            self.out.insert(self.path.join("."), to_host(t));
        }
    }
}

/// Every float parameter, keyed by its path (= Hugging Face name).
pub fn named_params<M: Module>(module: &M) -> BTreeMap<String, HostTensor> {
    let mut c = Collect {
        path: Vec::new(),
        grads: None,
        out: BTreeMap::new(),
    };
    module.visit(&mut c);
    c.out
}

/// Gradients of every parameter that has one, by name.
pub fn named_grads<M: Module>(module: &M, grads: &Gradients) -> BTreeMap<String, HostTensor> {
    let mut c = Collect {
        path: Vec::new(),
        grads: Some(grads),
        out: BTreeMap::new(),
    };
    module.visit(&mut c);
    c.out
}

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

struct Gather {
    path: Vec<String>,
    out: ParamMap,
}

impl ModuleVisitor for Gather {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val().inner();
        let shape = t.dims().to_vec();
        let value = t.reshape([shape.iter().product::<usize>()]);
        self.out
            .insert(self.path.join("."), ParamTensor { shape, value });
    }
}

/// Every float parameter of `module` on its device (no host copy).
pub fn param_map<M: Module>(module: &M) -> ParamMap {
    let mut g = Gather {
        path: Vec::new(),
        out: ParamMap::new(),
    };
    module.visit(&mut g);
    g.out
}

struct Replace<'a> {
    path: Vec<String>,
    params: &'a ParamMap,
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
        let Some(new) = self.params.get(&name) else {
            return param;
        };
        param.map(|old| {
            let dims = old.dims();
            assert_eq!(new.shape, dims, "parameter {name}: shape");
            let value = new.value.clone().reshape(dims);
            if old.is_autodiff() {
                value.autodiff().require_grad()
            } else {
                value
            }
        })
    }
}

/// `module` with every parameter named in `params` replaced by its value
/// (shapes must match; parameters not named keep theirs).
pub fn with_params<M: Module>(module: M, params: &ParamMap) -> M {
    module.map(&mut Replace {
        path: Vec::new(),
        params,
    })
}

struct Ids<'a> {
    path: Vec<String>,
    read: Option<&'a BTreeMap<String, u64>>,
    out: BTreeMap<String, u64>,
}

impl ModuleVisitor for Ids<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.insert(self.path.join("."), param.id.val());
    }
}

impl ModuleMapper for Ids<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.join(".");
        match self.read.and_then(|ids| ids.get(&name)) {
            Some(&id) => {
                let (_, value, mapper) = param.consume();
                Param::from_mapped_value(burn::module::ParamId::from(id), value, mapper)
            }
            None => param,
        }
    }
}

/// The optimizer-state key (`ParamId`) of every float parameter, by name.
pub fn param_ids<M: Module>(module: &M) -> BTreeMap<String, u64> {
    let mut v = Ids {
        path: Vec::new(),
        read: None,
        out: BTreeMap::new(),
    };
    module.visit(&mut v);
    v.out
}

/// `module` with the parameter ids of an earlier run, so that optimizer
/// state saved then applies to the parameters loaded now.
pub fn with_param_ids<M: Module>(module: M, ids: &BTreeMap<String, u64>) -> M {
    module.map(&mut Ids {
        path: Vec::new(),
        read: Some(ids),
        out: BTreeMap::new(),
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
