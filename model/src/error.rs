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
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
