//! Parameters by their Hugging Face names: read them out of a module (to
//! save, or for weight-space algebra) and gradients by the same names.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Gradients;
use burn::tensor::Tensor;

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
