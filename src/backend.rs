//! The one place where a backend becomes a device.

use anyhow::{Result, bail};
use burn::tensor::Device;

use crate::cli::Backend;

/// What every command gets from the global flags: the backend, turned into
/// a device only by the commands that compute.
pub struct Env {
    backend: Backend,
    name: String,
}

impl Env {
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            name: format!("{backend:?}").to_lowercase(),
        }
    }

    pub fn device(&self) -> Result<Device> {
        device(self.backend)
    }

    /// The backend's name, as provenance records it.
    pub fn backend(&self) -> &str {
        &self.name
    }
}

fn device(backend: Backend) -> Result<Device> {
    Ok(match backend {
        Backend::Flex => Device::flex(),
        #[cfg(feature = "ndarray")]
        Backend::Ndarray => Device::ndarray(),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
        #[cfg(feature = "vulkan")]
        Backend::Vulkan => Device::vulkan(burn::tensor::DeviceKind::DefaultDevice),
        #[cfg(feature = "metal")]
        Backend::Metal => Device::metal(burn::tensor::DeviceKind::DefaultDevice),
        #[cfg(feature = "cuda")]
        Backend::Cuda => Device::cuda(0),
        #[allow(unreachable_patterns)]
        other => {
            let feature = format!("{other:?}").to_lowercase();
            bail!(
                "backend {feature} is not compiled in: rebuild with `cargo build --release --features {feature}`"
            )
        }
    })
}
