//! Hugging Face weight files: one `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Tensors are read as f32 whatever their
//! stored dtype (f32, bf16, f16); every tensor is checked for size and
//! finiteness before a model sees it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorView};

use crate::error::{ModelError, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct WeightFile {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// All weight files of one checkpoint directory, memory-mapped.
pub struct Weights {
    dir: PathBuf,
    files: Vec<WeightFile>,
    location: BTreeMap<String, usize>,
}

/// A tensor converted to f32, in its stored (Hugging Face) layout.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Weights {
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let shard_names: Vec<String> = if single.is_file() {
            vec![SINGLE_FILE.to_string()]
        } else if index.is_file() {
            shards_of_index(&index)?
        } else {
            return Err(ModelError::NoWeights {
                dir: dir.to_path_buf(),
            });
        };
        let mut files = Vec::new();
        let mut location = BTreeMap::new();
        for name in shard_names {
            let file = open_file(&dir.join(&name))?;
            for tensor in file.metadata.tensors().keys() {
                if location.insert(tensor.clone(), files.len()).is_some() {
                    return Err(ModelError::Tensor {
                        path: file.path.clone(),
                        tensor: tensor.clone(),
                        reason: "appears in more than one shard".into(),
                    });
                }
            }
            files.push(file);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            location,
        })
    }

    /// One safetensors file on its own (e.g. reference gradients).
    pub fn open_file(path: &Path) -> Result<Self> {
        let file = open_file(path)?;
        let location = file
            .metadata
            .tensors()
            .into_keys()
            .map(|name| (name, 0))
            .collect();
        Ok(Self {
            dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            files: vec![file],
            location,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    /// Stored dtype and shape, without reading the data.
    pub fn info(&self, name: &str) -> Option<(Dtype, Vec<usize>)> {
        let file = &self.files[*self.location.get(name)?];
        let info = file.metadata.info(name)?;
        Some((info.dtype, info.shape.clone()))
    }

    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.location
            .get(name)
            .map(|&i| self.files[i].path.as_path())
    }

    /// The file holding `name`, its stored dtype and its bytes' range there.
    fn locate(&self, name: &str) -> Result<(&WeightFile, Dtype, std::ops::Range<usize>)> {
        let &i = self
            .location
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                dir: self.dir.clone(),
                tensor: name.to_string(),
            })?;
        let file = &self.files[i];
        let info = file.metadata.info(name).expect("indexed tensor exists");
        let start = 8 + file.header_len + info.data_offsets.0;
        let end = 8 + file.header_len + info.data_offsets.1;
        Ok((file, info.dtype, start..end))
    }

    pub fn read(&self, name: &str) -> Result<HostTensor> {
        let (file, dtype, range) = self.locate(name)?;
        let (start, end) = (range.start, range.end);
        let info = file.metadata.info(name).expect("indexed tensor exists");
        let bytes = &file.map[start..end];
        let err = |reason: String| ModelError::Tensor {
            path: file.path.clone(),
            tensor: name.to_string(),
            reason,
        };
        let data = to_f32(dtype, bytes).map_err(err)?;
        file.release(start, end - start);
        if let Some(pos) = data.iter().position(|x| !x.is_finite()) {
            return Err(err(format!(
                "holds a non-finite value ({}) at flat index {pos}",
                data[pos]
            )));
        }
        Ok(HostTensor {
            shape: info.shape.clone(),
            data,
        })
    }
}

impl Weights {
    /// The matrix `name` quantized block by block from the file's bytes (no
    /// f32 copy of the whole tensor; see [`crate::quant`]).
    pub fn read_quantized(
        &self,
        name: &str,
        format: crate::quant::QuantFormat,
        shape: [usize; 2],
    ) -> Result<crate::quant::QuantMatrix> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (file, dtype, range) = self.locate(name)?;
        let (start, end) = (range.start, range.end);
        let bytes = &file.map[start..end];
        let err = |reason: String| ModelError::Tensor {
            path: file.path.clone(),
            tensor: name.to_string(),
            reason,
        };
        let width = match dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            other => {
                return Err(err(format!(
                    "dtype {other:?} is not a float type posttrain reads"
                )));
            }
        };
        let len = shape[0] * shape[1];
        if bytes.len() != len * width {
            return Err(err(format!("{} bytes for {shape:?}", bytes.len())));
        }
        let decode = |at: usize| -> f32 {
            let b = &bytes[at * width..(at + 1) * width];
            match dtype {
                Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                Dtype::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                _ => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            }
        };
        let bad = AtomicUsize::new(usize::MAX);
        let q = crate::quant::QuantMatrix::from_blocks(format, shape, |from, out| {
            for (j, o) in out.iter_mut().enumerate() {
                *o = decode(from + j);
            }
            if let Some(p) = out.iter().position(|x| !x.is_finite()) {
                bad.fetch_min(from + p, Ordering::Relaxed);
            }
        });
        file.release(start, end - start);
        let pos = bad.into_inner();
        if pos != usize::MAX {
            return Err(err(format!(
                "holds a non-finite value ({}) at flat index {pos}",
                decode(pos)
            )));
        }
        Ok(q)
    }
}

impl WeightFile {
    /// Drops the mapped pages of a range that has been read, so that
    /// loading a model holds its converted weights and not also the
    /// file's pages (a bf16 2B checkpoint is 5 GB of them).
    fn release(&self, start: usize, len: usize) {
        #[cfg(unix)]
        // SAFETY: the mapping is a read-only mapping of a file and no
        // reference into this range outlives this call (`read` has
        // converted it into an owned Vec): MADV_DONTNEED only drops the
        // pages, and a later read of the range faults them in again from
        // the file. The result is advisory, so an error is ignored.
        unsafe {
            let _ = self
                .map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len);
        }
        #[cfg(not(unix))]
        let _ = (start, len);
    }
}

fn shards_of_index(index: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = fs_err::read_to_string(index)?;
    let parsed: Index = serde_json::from_str(&text).map_err(|e| ModelError::Index {
        path: index.to_path_buf(),
        reason: format!("not a safetensors index: {e}"),
    })?;
    let mut shards: Vec<String> = parsed.weight_map.into_values().collect();
    shards.sort();
    shards.dedup();
    for shard in &shards {
        if shard.contains('/') || shard.contains('\\') || shard == ".." {
            return Err(ModelError::Index {
                path: index.to_path_buf(),
                reason: format!("shard name {shard:?} is not a plain file name"),
            });
        }
    }
    Ok(shards)
}

fn open_file(path: &Path) -> Result<WeightFile> {
    let file = fs_err::File::open(path)?;
    // SAFETY: the map is read-only and checkpoints are not modified while a
    // model loads them (outputs are written to a temp dir and renamed).
    let map = unsafe { Mmap::map(file.file()) }.map_err(|e| ModelError::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(&map).map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            reason: describe(&e),
        })?;
    Ok(WeightFile {
        path: path.to_path_buf(),
        map,
        header_len,
        metadata,
    })
}

fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => {
            "the header promises more bytes than the file holds (truncated?)".into()
        }
        E::HeaderTooSmall | E::InvalidHeaderLength => "the file is too short for a header".into(),
        E::TensorInvalidInfo => "a tensor's offsets do not match its dtype and shape".into(),
        other => other.to_string(),
    }
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> std::result::Result<Vec<f32>, String> {
    let pairs = bytes.chunks_exact(2).map(|c| [c[0], c[1]]);
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => pairs
            .map(|b| half::bf16::from_le_bytes(b).to_f32())
            .collect(),
        Dtype::F16 => pairs
            .map(|b| half::f16::from_le_bytes(b).to_f32())
            .collect(),
        other => {
            return Err(format!(
                "dtype {other:?} is not a float type posttrain reads"
            ));
        }
    })
}

/// Stored precision of written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaveDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl SaveDtype {
    /// The name `transformers` gives this dtype in `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
            SaveDtype::F16 => "float16",
        }
    }

    fn encode(self, data: &[f32]) -> (Dtype, Vec<u8>) {
        match self {
            SaveDtype::F32 => (
                Dtype::F32,
                data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            SaveDtype::Bf16 => (
                Dtype::BF16,
                data.iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
            ),
            SaveDtype::F16 => (
                Dtype::F16,
                data.iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect(),
            ),
        }
    }
}

/// Serialises tensors to safetensors bytes with `format = pt`, as
/// `transformers` requires.
pub fn to_safetensors_bytes(tensors: &BTreeMap<String, HostTensor>, dtype: SaveDtype) -> Vec<u8> {
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let (dt, bytes) = dtype.encode(&t.data);
            (name.clone(), dt, t.shape.clone(), bytes)
        })
        .collect();
    let views = encoded.iter().map(|(name, dt, shape, bytes)| {
        (
            name.as_str(),
            TensorView::new(*dt, shape.clone(), bytes).expect("sizes agree by construction"),
        )
    });
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata)).expect("in-memory serialisation")
}

/// Writes tensors as `n` shards plus an index, the layout of the published
/// Gemma-2 checkpoints (`model-00001-of-0000n.safetensors`).
pub fn write_shards(
    dir: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    n: usize,
    dtype: SaveDtype,
) -> Result<()> {
    let names: Vec<&String> = tensors.keys().collect();
    let per = names.len().div_ceil(n.max(1));
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    for (k, chunk) in names.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
        let part: BTreeMap<String, HostTensor> = chunk
            .iter()
            .map(|name| ((*name).clone(), tensors[*name].clone()))
            .collect();
        let bytes = to_safetensors_bytes(&part, dtype);
        total += bytes.len();
        posttrain_files::write_synced(&dir.join(&file), &bytes)?;
        for name in chunk {
            weight_map.insert((*name).clone(), file.clone());
        }
    }
    let index = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    });
    posttrain_files::write_synced(
        &dir.join(INDEX_FILE),
        serde_json::to_string_pretty(&index)
            .expect("json")
            .as_bytes(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BTreeMap<String, HostTensor> {
        BTreeMap::from([
            (
                "a".to_string(),
                HostTensor {
                    shape: vec![2, 2],
                    data: vec![1.0, -2.5, 3.25, 0.0],
                },
            ),
            (
                "b".to_string(),
                HostTensor {
                    shape: vec![3],
                    data: vec![0.5, 1.5, -7.0],
                },
            ),
        ])
    }

    #[test]
    fn roundtrip_in_every_dtype_and_sharded() {
        for dtype in [SaveDtype::F32, SaveDtype::Bf16, SaveDtype::F16] {
            let dir = tempfile::tempdir().unwrap();
            fs_err::write(
                dir.path().join(SINGLE_FILE),
                to_safetensors_bytes(&sample(), dtype),
            )
            .unwrap();
            let w = Weights::open(dir.path()).unwrap();
            // these values are exact in bf16 and f16
            assert_eq!(w.read("a").unwrap(), sample()["a"]);
            assert_eq!(w.read("b").unwrap(), sample()["b"]);

            let dir = tempfile::tempdir().unwrap();
            write_shards(dir.path(), &sample(), 2, dtype).unwrap();
            let w = Weights::open(dir.path()).unwrap();
            assert_eq!(w.files().len(), 2);
            assert_eq!(w.read("b").unwrap(), sample()["b"]);
        }
    }

    #[test]
    fn truncated_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = to_safetensors_bytes(&sample(), SaveDtype::F32);
        let path = dir.path().join(SINGLE_FILE);
        fs_err::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = Weights::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("truncated"),
            "{err}"
        );
    }

    #[test]
    fn non_finite_values_are_refused() {
        let mut t = sample();
        t.get_mut("b").unwrap().data[1] = f32::NAN;
        let dir = tempfile::tempdir().unwrap();
        fs_err::write(
            dir.path().join(SINGLE_FILE),
            to_safetensors_bytes(&t, SaveDtype::F32),
        )
        .unwrap();
        let err = Weights::open(dir.path())
            .unwrap()
            .read("b")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tensor b") && err.contains("non-finite"),
            "{err}"
        );
    }
}
