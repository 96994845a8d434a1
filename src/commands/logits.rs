use std::collections::BTreeMap;

use anyhow::{Result, bail};
use posttrain_files::write_atomic;
use posttrain_model::checkpoint::load_causal_lm_frozen;
use posttrain_model::safetensors_io::to_safetensors_bytes;
use posttrain_model::{HostTensor, SaveDtype, TokenBatch};
use safetensors::{Dtype, SafeTensors};

use crate::backend::Env;
use crate::cli::LogitsArgs;

fn read_ids(path: &std::path::Path) -> Result<TokenBatch> {
    let bytes = fs_err::read(path)?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a readable safetensors file: {e}", path.display()))?;
    let t = st
        .tensor("ids")
        .map_err(|_| anyhow::anyhow!("{}: no tensor named `ids`", path.display()))?;
    let [batch, len] = t.shape() else {
        bail!(
            "{}: tensor ids has shape {:?}, expected [batch, len]",
            path.display(),
            t.shape()
        );
    };
    let ids: Vec<i64> = match t.dtype() {
        Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        Dtype::I32 => t
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
            .collect(),
        other => bail!(
            "{}: tensor ids is {other:?}, expected I64 or I32",
            path.display()
        ),
    };
    if *len == 0 {
        bail!("{}: tensor ids is empty", path.display());
    }
    let ids = ids
        .into_iter()
        .map(|x| {
            u32::try_from(x).map_err(|_| anyhow::anyhow!("{}: negative id {x}", path.display()))
        })
        .collect::<Result<Vec<u32>>>()?;
    Ok(TokenBatch::dense(ids, *batch, *len))
}

pub fn run(args: LogitsArgs, env: &Env) -> Result<()> {
    let device = env.device()?;
    super::refuse_existing(Some(&args.out), args.overwrite)?;
    let batch = read_ids(&args.ids)?;
    let held = args.weights_dtype.resolve(&args.model, &device)?;
    let (config, model) = load_causal_lm_frozen(&args.model, &device, held)?;
    if let Some(bad) = batch
        .ids
        .iter()
        .find(|&&id| id as usize >= config.vocab_size)
    {
        bail!(
            "{}: token id {bad} is outside the model's vocabulary of {}",
            args.ids.display(),
            config.vocab_size
        );
    }
    let logits = model.forward(&batch);
    let shape = logits.dims().to_vec();
    let data = logits.into_data().try_into_vec_as::<f32>()?;
    let tensors = BTreeMap::from([("logits".to_string(), HostTensor { shape, data })]);
    write_atomic(
        &args.out,
        &to_safetensors_bytes(&tensors, SaveDtype::F32),
        args.overwrite,
    )?;
    Ok(())
}
