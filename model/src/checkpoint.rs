//! The checkpoint directory: `config.json`, `model.safetensors` (or shards),
//! `tokenizer.json` and provenance. Loading validates every tensor against
//! the config; writing goes to a temp dir that is renamed into place, so a
//! directory under the final name is always complete.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::Device;

use crate::config::Gemma2Config;
use crate::error::{ModelError, Result};
use crate::gemma2::{Gemma2ForCausalLM, Gemma2ForSequenceClassification};
use crate::init::{CheckpointSource, RandomInit};
use crate::lora::{Adaptable, Adapter};
use crate::params::{ParamTensor, named_params, param_map, with_params};
use crate::quant::QuantFormat;
use crate::safetensors_io::{
    HostTensor, SINGLE_FILE, SaveDtype, Weights, to_safetensors_bytes, write_shards,
};

pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The config of a checkpoint, or of an adapter directory's base.
pub fn load_config(dir: &Path) -> Result<Gemma2Config> {
    if let Some(adapter) = Adapter::find(dir)? {
        return load_config(&adapter.base);
    }
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Err(ModelError::Config {
            path,
            reason: "file not found".into(),
        });
    }
    Gemma2Config::from_file(&path)
}

/// How a frozen model's matrices are held in memory (every product
/// computes in f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrozenDtype {
    F32,
    /// Every matrix in bf16.
    Bf16,
    /// The seven projections quantized ([`crate::quant`]); the embedding
    /// and norms as the checkpoint stores them (bf16 for a 16-bit one).
    Quantized(QuantFormat),
}

impl FrozenDtype {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Quantized(f) => f.name(),
        }
    }

    /// Bytes a model of `config` occupies held this way, with the embedding
    /// and norms in `other_bytes` bytes per element.
    pub fn model_bytes(self, config: &Gemma2Config, other_bytes: u64) -> u64 {
        let all = config.num_params() as u64;
        match self {
            Self::F32 => 4 * all,
            Self::Bf16 => 2 * all,
            Self::Quantized(f) => {
                let projections = config.projection_params() as u64;
                (projections as f64 * f.bytes_per_element()) as u64
                    + (all - projections) * other_bytes
            }
        }
    }
}

/// Matrices held as `dtype` says (frozen models; f32 for training).
fn load<M>(
    dir: &Path,
    device: &Device,
    dtype: FrozenDtype,
    build: impl FnOnce(&Gemma2Config, &mut CheckpointSource, &Device) -> Result<M>,
) -> Result<(Gemma2Config, M)> {
    let config = load_config(dir)?;
    let weights = Weights::open(dir)?;
    let mut source = CheckpointSource::new(&weights);
    set_holding(&mut source, dir, dtype)?;
    let model = build(&config, &mut source, device).map_err(|e| e.in_dir(dir))?;
    source.finish()?;
    Ok((config, model))
}

fn set_holding(source: &mut CheckpointSource, dir: &Path, dtype: FrozenDtype) -> Result<()> {
    (source.compact, source.quantize) = match dtype {
        FrozenDtype::F32 => (false, None),
        FrozenDtype::Bf16 => (true, None),
        FrozenDtype::Quantized(f) => (stores_16_bit(dir)?, Some(f)),
    };
    Ok(())
}

/// Whether `device` keeps bf16 tensors for compact loading: the CPU (`flex`)
/// backend does; WGSL has no bf16, and the others are untested.
pub fn compact_supported(device: &Device) -> bool {
    use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
    use burn::backend::{Autodiff, Flex};
    let t = || burn::tensor::Tensor::<1>::zeros([1], device);
    t().try_into_primitive::<Flex>().is_ok()
        || t()
            .try_into_primitive::<Autodiff<Flex, NoCheckpointing>>()
            .is_ok()
        || t()
            .try_into_primitive::<Autodiff<Flex, BalancedCheckpointing>>()
            .is_ok()
}

/// Refuses a held dtype other than f32 where the backend has no kernel for
/// it, before any weight is read.
pub fn refuse_unsupported(dir: &Path, device: &Device, dtype: FrozenDtype) -> Result<()> {
    if dtype == FrozenDtype::F32 || compact_supported(device) {
        return Ok(());
    }
    Err(ModelError::Output {
        path: dir.to_path_buf(),
        reason: format!(
            "{} weights are held only on the flex (CPU) backend; use --weights-dtype f32",
            dtype.name()
        ),
    })
}

/// A causal LM for inference with its matrices held in bf16 (half the
/// memory of f32; every product still computes in f32): a checkpoint, or an
/// adapter directory merged first. Not for training: the matrices are frozen.
pub fn load_causal_lm_compact(
    dir: &Path,
    device: &Device,
) -> Result<(Gemma2Config, Gemma2ForCausalLM)> {
    load_causal_lm_frozen(dir, device, FrozenDtype::Bf16)
}

/// A frozen causal LM, its matrices held as `dtype` says: a checkpoint, or
/// an adapter directory on its base (merged, or kept as factors on a
/// quantized base).
pub fn load_causal_lm_frozen(
    dir: &Path,
    device: &Device,
    dtype: FrozenDtype,
) -> Result<(Gemma2Config, Gemma2ForCausalLM)> {
    refuse_unsupported(dir, device, dtype)?;
    if let Some(adapter) = Adapter::find(dir)? {
        let (config, base) = load_causal_lm_frozen(&adapter.base, device, dtype)?;
        let model = apply_adapter(base.attach_lora(&adapter.config, 0), &adapter)?;
        return Ok((config, model.merge_lora()));
    }
    load(dir, device, dtype, |c, s, d| {
        Gemma2ForCausalLM::new(c, s, d)
    })
}

/// [`load_reward_model`] for a frozen reward model, its matrices in bf16.
pub fn load_reward_model_compact(
    dir: &Path,
    device: &Device,
) -> Result<(Gemma2Config, Gemma2ForSequenceClassification)> {
    load_reward_model_frozen(dir, device, FrozenDtype::Bf16)
}

/// [`load_reward_model`] for a frozen reward model, its matrices held as
/// `dtype` says (the `score` head stays f32 when quantized).
pub fn load_reward_model_frozen(
    dir: &Path,
    device: &Device,
    dtype: FrozenDtype,
) -> Result<(Gemma2Config, Gemma2ForSequenceClassification)> {
    refuse_unsupported(dir, device, dtype)?;
    reward_model(dir, device, dtype)
}

/// Whether a frozen model from `dir` is held compact on `device`: its
/// checkpoint stores 16-bit weights and the backend keeps bf16.
pub fn holds_compact(dir: &Path, device: &Device) -> Result<bool> {
    Ok(stores_16_bit(dir)? && compact_supported(device))
}

/// Whether the checkpoint (an adapter's base) stores its embedding in a
/// 16-bit float type.
pub fn stores_16_bit(dir: &Path) -> Result<bool> {
    if let Some(adapter) = Adapter::find(dir)? {
        return stores_16_bit(&adapter.base);
    }
    let weights = Weights::open(dir)?;
    Ok(matches!(
        weights.info("model.embed_tokens.weight"),
        Some((safetensors::Dtype::BF16 | safetensors::Dtype::F16, _))
    ))
}

/// Whether `dir` holds a reward model (a `score` head, or a
/// sequence-classification adapter) rather than a causal LM.
pub fn is_reward_model(dir: &Path) -> Result<bool> {
    Ok(match Adapter::find(dir)? {
        Some(adapter) => adapter.task == crate::lora::PeftTask::SequenceClassification,
        None => Weights::open(dir)?.info("score.weight").is_some(),
    })
}

/// A causal LM from a checkpoint, or from an adapter directory (its base
/// with the adapters merged in).
pub fn load_causal_lm(dir: &Path, device: &Device) -> Result<(Gemma2Config, Gemma2ForCausalLM)> {
    if let Some(adapter) = Adapter::find(dir)? {
        let (config, base) = load_causal_lm(&adapter.base, device)?;
        let model = apply_adapter(base.attach_lora(&adapter.config, 0), &adapter)?;
        return Ok((config, model.merge_lora()));
    }
    load(dir, device, FrozenDtype::F32, |c, s, d| {
        Gemma2ForCausalLM::new(c, s, d)
    })
}

/// A reward model from a checkpoint, or from an adapter directory (its base
/// trunk with the adapters merged in and the adapter's `score` head).
pub fn load_reward_model(
    dir: &Path,
    device: &Device,
) -> Result<(Gemma2Config, Gemma2ForSequenceClassification)> {
    reward_model(dir, device, FrozenDtype::F32)
}

/// A reward checkpoint, or an adapter directory on a trunk (its `score`
/// head from the adapter), matrices held as `dtype` says.
fn reward_model(
    dir: &Path,
    device: &Device,
    dtype: FrozenDtype,
) -> Result<(Gemma2Config, Gemma2ForSequenceClassification)> {
    if let Some(adapter) = Adapter::find(dir)? {
        let (config, base, _) = load_reward_trunk_as(&adapter.base, 0, device, dtype)?;
        let model = apply_adapter(base.attach_lora(&adapter.config, 0), &adapter)?;
        return Ok((config, model.merge_lora()));
    }
    load(dir, device, dtype, |c, s, d| {
        Gemma2ForSequenceClassification::new(c, s, d)
    })
}

/// `model` (with factors attached) given the adapter's tensors: every
/// factor must be in the file and every tensor of the file in the model.
fn apply_adapter<M: Module>(model: M, adapter: &Adapter) -> Result<M> {
    let file = adapter.dir.join(crate::lora::ADAPTER_WEIGHTS_FILE);
    let tensors = adapter.tensors()?;
    let mut params = param_map(&model);
    for (name, t) in &tensors {
        let bad = |reason: String| ModelError::Tensor {
            path: file.clone(),
            tensor: crate::lora::peft_key(name),
            reason,
        };
        let Some(p) = params.get_mut(name) else {
            return Err(bad(format!(
                "is not a parameter of the base model with the adapter's target modules {:?}",
                adapter.config.targets
            )));
        };
        if p.shape != t.shape {
            return Err(bad(format!(
                "shape {:?}, but the base model and r = {} imply {:?}",
                t.shape, adapter.config.rank, p.shape
            )));
        }
        *p = ParamTensor::from_host(t, &p.value.device());
    }
    if let Some(missing) = params
        .keys()
        .find(|n| crate::lora::in_adapter(n) && n.contains(".lora_") && !tensors.contains_key(*n))
    {
        return Err(ModelError::MissingTensor {
            dir: adapter.dir.clone(),
            tensor: crate::lora::peft_key(missing),
        });
    }
    Ok(with_params(model, &params))
}

/// A reward model whose trunk comes from `dir` (a causal LM or reward
/// checkpoint); the `score` head is read when present, else drawn with
/// `seed`. Returns whether the head is new.
pub fn load_reward_trunk(
    dir: &Path,
    seed: u64,
    device: &Device,
) -> Result<(Gemma2Config, Gemma2ForSequenceClassification, bool)> {
    load_reward_trunk_as(dir, seed, device, FrozenDtype::F32)
}

/// [`load_reward_trunk`] with the trunk's matrices held as `dtype` says (a
/// LoRA run's frozen base, or a frozen reward model's).
pub fn load_reward_trunk_as(
    dir: &Path,
    seed: u64,
    device: &Device,
    dtype: FrozenDtype,
) -> Result<(Gemma2Config, Gemma2ForSequenceClassification, bool)> {
    refuse_unsupported(dir, device, dtype)?;
    let config = load_config(dir)?;
    let weights = Weights::open(dir)?;
    let fresh = weights.info("score.weight").is_none();
    let mut source = crate::init::NewHead {
        checkpoint: CheckpointSource::new(&weights),
        head: RandomInit::new(seed),
    };
    set_holding(&mut source.checkpoint, dir, dtype)?;
    let model = Gemma2ForSequenceClassification::new(&config, &mut source, device)?;
    source.checkpoint.finish()?;
    Ok((config, model, fresh))
}

/// A checkpoint directory being written. Nothing appears under the final
/// name until [`CheckpointWriter::commit`].
pub struct CheckpointWriter {
    target: PathBuf,
    tmp: tempfile::TempDir,
    registration: posttrain_files::staging::Registration,
}

impl CheckpointWriter {
    /// Refuses an existing `target` unless `overwrite`.
    pub fn create(target: &Path, overwrite: bool) -> Result<Self> {
        posttrain_files::refuse_existing(target, overwrite)?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs_err::create_dir_all(&parent)?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "checkpoint".into());
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.tmp-"))
            .tempdir_in(&parent)
            .map_err(|e| ModelError::Output {
                path: parent.clone(),
                reason: format!("cannot create a temporary directory: {e}"),
            })?;
        Ok(Self {
            registration: posttrain_files::staging::register(tmp.path(), target),
            target: target.to_path_buf(),
            tmp,
        })
    }

    /// `r` with its error naming the final path instead of the staging one.
    fn named<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| {
            let staging = self.path().to_string_lossy().into_owned();
            let message = e.to_string();
            if !message.contains(&staging) {
                return e;
            }
            ModelError::Output {
                path: self.target.clone(),
                reason: message.replace(&staging, &self.target.to_string_lossy()),
            }
        })
    }

    /// Where files go before the commit.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub fn write(&self, file: &str, bytes: &[u8]) -> Result<()> {
        let written = posttrain_files::write_synced(&self.path().join(file), bytes);
        self.named(written.map_err(ModelError::from))
    }

    /// A LoRA adapter directory's two files: `tensors` under PEFT's keys and
    /// `adapter_config.json` naming the base as `origin` resolved it.
    pub fn write_adapter(
        &self,
        tensors: &BTreeMap<String, HostTensor>,
        origin: &crate::provenance::LoraOrigin,
    ) -> Result<()> {
        self.write(
            crate::lora::ADAPTER_WEIGHTS_FILE,
            &to_safetensors_bytes(tensors, SaveDtype::F32),
        )?;
        let base = origin.base.resolved.as_ref().unwrap_or(&origin.base.path);
        self.write(
            crate::lora::ADAPTER_CONFIG_FILE,
            origin
                .config
                .to_peft_json(Path::new(base), origin.task)
                .as_bytes(),
        )
    }

    pub fn write_model<M: Module>(
        &self,
        model: &M,
        config: &Gemma2Config,
        dtype: SaveDtype,
    ) -> Result<()> {
        self.write_weights(config, &named_params(model), dtype, 1)
    }

    /// `config.json` plus the tensors, in one file or `shards` files with an
    /// index.
    pub fn write_weights(
        &self,
        config: &Gemma2Config,
        tensors: &BTreeMap<String, HostTensor>,
        dtype: SaveDtype,
        shards: usize,
    ) -> Result<()> {
        self.write(
            CONFIG_FILE,
            config.to_json_with_dtype(dtype.torch_name()).as_bytes(),
        )?;
        if shards > 1 {
            self.named(write_shards(self.path(), tensors, shards, dtype))
        } else {
            self.write(SINGLE_FILE, &to_safetensors_bytes(tensors, dtype))
        }
    }

    /// Copies `file` from `parent` when it exists there.
    pub fn copy_from(&self, parent: &Path, file: &str) -> Result<bool> {
        let src = parent.join(file);
        if !src.is_file() {
            return Ok(false);
        }
        self.write(file, &fs_err::read(&src)?)?;
        Ok(true)
    }

    /// Moves the directory in place; on ranks other than 0 of a
    /// data-parallel run it is dropped instead (rank 0 writes the outputs).
    pub fn commit(self) -> Result<PathBuf> {
        if !posttrain_dist::world().is_root() {
            return Ok(self.target);
        }
        let Self {
            target,
            tmp,
            registration,
        } = self;
        let tmp = tmp.keep();
        let renamed = registration.commit(|| {
            if target.exists() {
                // one atomic swap where the file system has it: a kill at
                // any moment leaves the old or the new directory at `target`
                if posttrain_files::exchange(&tmp, &target)? {
                    return Ok(Some(tmp.clone()));
                }
                // unique like `tmp`: a run killed between the renames leaves
                // its `.old` behind, which must not block the next commit
                let mut old = tmp.clone().into_os_string();
                old.push(".old");
                let old = PathBuf::from(old);
                fs_err::rename(&target, &old)?;
                fs_err::rename(&tmp, &target)?;
                Ok(Some(old))
            } else {
                fs_err::rename(&tmp, &target).map(|()| None)
            }
        });
        match renamed {
            Ok(Some(old)) => fs_err::remove_dir_all(&old)?,
            Ok(None) => {}
            Err(e) => {
                let _ = fs_err::remove_dir_all(&tmp);
                return Err(e.into());
            }
        }
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leftover_old_directory_does_not_block_replacing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.state");
        for round in 0..3 {
            let writer = CheckpointWriter::create(&target, true).unwrap();
            writer.write("n", round.to_string().as_bytes()).unwrap();
            writer.commit().unwrap();
            // what a run killed between the two renames leaves beside it
            let stale = dir.path().join(format!(".out.state.tmp-killed{round}.old"));
            fs_err::create_dir_all(&stale).unwrap();
            fs_err::write(stale.join("n"), b"stale").unwrap();
            fs_err::create_dir_all(dir.path().join(".out.state.old")).unwrap();
            fs_err::write(dir.path().join(".out.state.old/n"), b"stale").unwrap();
        }
        assert_eq!(fs_err::read_to_string(target.join("n")).unwrap(), "2");
    }
}
