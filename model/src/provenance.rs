//! `posttrain.json`: where a checkpoint came from — stage, parents (path and
//! content hash), every hyperparameter, seed, backend, version, final metrics.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::Result;

pub const PROVENANCE_FILE: &str = "posttrain.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parent {
    /// As given on the command line.
    pub path: String,
    /// Absolute, as it was resolved when the output was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<String>,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub stage: String,
    pub parents: Vec<Parent>,
    pub params: Value,
    pub seed: Option<u64>,
    pub backend: String,
    /// Where samples were drawn (`--sample-on`): `host` or `device`.
    #[serde(default = "host")]
    pub sample_on: String,
    pub metrics: Value,
    pub posttrain_version: String,
    /// Processes that ran the stage (ranks of `mpirun`; 1 without).
    #[serde(default = "one")]
    pub world_size: usize,
    /// An adapter directory's base and LoRA settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraOrigin>,
    /// How the models the stage read were held in memory, by role (`base`,
    /// `teacher`, `reference`, `reward`, `model`): f32, bf16, int8, nf4.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub held: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraOrigin {
    pub base: Parent,
    pub config: crate::LoraConfig,
    pub task: crate::lora::PeftTask,
}

fn one() -> usize {
    1
}

fn host() -> String {
    "host".into()
}

impl Provenance {
    pub fn new(stage: &str, backend: &str, params: Value) -> Self {
        Self {
            stage: stage.to_string(),
            parents: Vec::new(),
            params,
            seed: None,
            backend: backend.to_string(),
            sample_on: crate::generate::sampling_place().to_string(),
            metrics: Value::Object(Default::default()),
            posttrain_version: env!("CARGO_PKG_VERSION").to_string(),
            world_size: posttrain_dist::world().size(),
            lora: None,
            held: Default::default(),
        }
    }

    /// Records that the model in `role` was held as `dtype`.
    pub fn held(mut self, role: &str, dtype: crate::checkpoint::FrozenDtype) -> Self {
        self.held.insert(role.to_string(), dtype.name().to_string());
        self
    }

    /// Marks the output as a LoRA adapter on `base` (a parent already named
    /// is not hashed again).
    pub fn with_lora(
        mut self,
        config: crate::LoraConfig,
        base: &Path,
        task: crate::lora::PeftTask,
    ) -> Result<Self> {
        let shown = base.display().to_string();
        let base = match self.parents.iter().find(|p| p.path == shown) {
            Some(p) => p.clone(),
            None => Parent {
                path: shown,
                resolved: std::path::absolute(base)
                    .ok()
                    .map(|p| p.display().to_string()),
                sha256: content_hash(base)?,
            },
        };
        self.lora = Some(LoraOrigin { base, config, task });
        Ok(self)
    }

    pub fn with_parent(mut self, path: &Path) -> Result<Self> {
        self.parents.push(Parent {
            path: path.display().to_string(),
            resolved: std::path::absolute(path)
                .ok()
                .map(|p| p.display().to_string()),
            sha256: content_hash(path)?,
        });
        Ok(self)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("provenance serialises")
    }

    /// Writes the provenance of a data file beside it, as
    /// `FILE.posttrain.json` (temp file + rename).
    pub fn write_beside(&self, data: &Path) -> Result<()> {
        let json = self.to_json();
        Ok(posttrain_files::write_atomic(
            &beside(data),
            json.as_bytes(),
            true,
        )?)
    }
}

/// Where the provenance of a data file lives: `FILE.posttrain.json`.
pub fn beside(data: &Path) -> std::path::PathBuf {
    let mut name = data.as_os_str().to_owned();
    name.push(".posttrain.json");
    name.into()
}

/// The provenance of a checkpoint directory or of a data file, when it has
/// one: a file's own `FILE.posttrain.json`, else that of the output
/// directory it is part of (e.g. `task/train.jsonl` of `data synth`).
pub fn read(path: &Path) -> Option<Provenance> {
    let parse = |file: std::path::PathBuf| -> Option<Provenance> {
        let text = fs_err::read_to_string(file).ok()?;
        serde_json::from_str(&text).ok()
    };
    if path.is_dir() {
        return parse(path.join(PROVENANCE_FILE));
    }
    parse(beside(path)).or_else(|| parse(path.parent()?.join(PROVENANCE_FILE)))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs_err::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// sha256 of a file, or of a checkpoint directory: the hash of the sorted
/// list of (name, sha256) of its config and weight files.
pub fn content_hash(path: &Path) -> Result<String> {
    if path.is_file() {
        return sha256_file(path);
    }
    let mut names: Vec<String> = fs_err::read_dir(path)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n == "config.json" || (n.starts_with("model") && n.contains(".safetensors")))
        .collect();
    names.sort();
    let mut hasher = Sha256::new();
    for name in names {
        hasher.update(name.as_bytes());
        hasher.update(sha256_file(&path.join(&name))?.as_bytes());
    }
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_hash_follows_weights_not_other_files() {
        let dir = tempfile::tempdir().unwrap();
        fs_err::write(dir.path().join("config.json"), "{}").unwrap();
        fs_err::write(dir.path().join("model.safetensors"), "abc").unwrap();
        let a = content_hash(dir.path()).unwrap();
        fs_err::write(dir.path().join("metrics.jsonl"), "{}").unwrap();
        assert_eq!(a, content_hash(dir.path()).unwrap());
        fs_err::write(dir.path().join("model.safetensors"), "abd").unwrap();
        assert_ne!(a, content_hash(dir.path()).unwrap());
        // a file hashes as itself: sha256("{}")
        assert_eq!(
            content_hash(&dir.path().join("config.json")).unwrap(),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }
}
