use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{path}: invalid config: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: not a readable safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: tensor {tensor}: {reason}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error("{dir}: tensor {tensor} is missing (the config asks for it)")]
    MissingTensor { dir: PathBuf, tensor: String },
    #[error(
        "{dir}: tensor {tensor} is not part of this model (does config.json match the weights?)"
    )]
    UnexpectedTensor { dir: PathBuf, tensor: String },
    #[error("{dir}: no model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("{path}: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Output { path: PathBuf, reason: String },
    #[error(
        "tensor {tensor}: {shape:?} in f32 is {bytes} bytes, more than the {limit} bytes this device binds to one kernel (wgpu's max_storage_buffer_binding_size); use --backend flex or a CUDA build (--features cuda)"
    )]
    OverDeviceLimit {
        tensor: String,
        shape: Vec<usize>,
        bytes: u64,
        limit: u64,
    },
}

impl ModelError {
    /// The error with the checkpoint directory it concerns, where it names none.
    pub(crate) fn in_dir(self, dir: &std::path::Path) -> Self {
        match self {
            Self::OverDeviceLimit { .. } => Self::Output {
                path: dir.to_path_buf(),
                reason: self.to_string(),
            },
            other => other,
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
