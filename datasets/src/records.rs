//! Record kinds with the column names Hugging Face TRL uses, in JSONL or
//! Parquet (chosen by extension). Parquet goes through polars and becomes the
//! same rows as JSONL, so both formats share one validation, and every bad
//! row is reported with its file and row (JSONL: line) number.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_json::writer::{LineDelimited, WriterBuilder};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use serde_json::{Map, Value, json};

use crate::tokenizer::{Message, Role};
use posttrain_files::write_atomic;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{path}:{row}: {reason}")]
    Line {
        path: PathBuf,
        row: usize,
        reason: String,
    },
    #[error("{path}: row {row}: {reason}")]
    Row {
        path: PathBuf,
        row: usize,
        reason: String,
    },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Parquet,
}

impl Format {
    pub fn of(path: &Path) -> Result<Self, DataError> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl") => Ok(Format::Jsonl),
            Some("parquet") => Ok(Format::Parquet),
            _ => Err(DataError::File {
                path: path.to_path_buf(),
                reason: "unsupported file type (expected .jsonl or .parquet)".into(),
            }),
        }
    }
}

/// A prompt: plain text (`prompt`) or a conversation (`messages`).
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Messages(Vec<Message>),
}

impl Prompt {
    /// The text shown in outputs: the prompt, or the last user message.
    pub fn display(&self) -> &str {
        match self {
            Prompt::Text(t) => t,
            Prompt::Messages(m) => m.last().map_or("", |m| m.content.as_str()),
        }
    }

    pub fn messages(&self) -> Vec<Message> {
        match self {
            Prompt::Text(t) => vec![Message {
                role: Role::User,
                content: t.clone(),
            }],
            Prompt::Messages(m) => m.clone(),
        }
    }

    fn to_json(&self, row: &mut Map<String, Value>) {
        match self {
            Prompt::Text(t) => row.insert("prompt".into(), t.clone().into()),
            Prompt::Messages(m) => row.insert("messages".into(), json!(m)),
        };
    }
}

/// Teacher top-k distribution for each completion token.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    pub ids: Vec<Vec<u32>>,
    pub logprobs: Vec<Vec<f32>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SftPair {
    pub prompt: Prompt,
    pub completion: String,
    pub teacher_topk: Option<TopK>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Preference {
    pub prompt: Prompt,
    pub chosen: String,
    pub rejected: String,
}

/// A row to train a causal LM on: plain `text` (every token is a target),
/// or a prompt/completion pair (rendered with the chat template).
#[derive(Debug, Clone, PartialEq)]
pub enum TrainRecord {
    Text(String),
    Pair(SftPair),
}

/// A record kind: how one row reads and writes.
pub trait Record: Sized {
    fn from_row(row: &Map<String, Value>) -> Result<Self, String>;
    fn to_row(&self) -> Value;
}

impl Record for Prompt {
    fn from_row(row: &Map<String, Value>) -> Result<Self, String> {
        if let Some(v) = row.get("prompt") {
            return Ok(Prompt::Text(non_empty_string(v, "prompt")?));
        }
        if let Some(v) = row.get("messages") {
            let messages: Vec<Message> =
                serde_json::from_value(v.clone()).map_err(|e| format!("column `messages`: {e}"))?;
            if messages.is_empty() {
                return Err("column `messages` is empty".into());
            }
            return Ok(Prompt::Messages(messages));
        }
        Err("missing column `prompt` (or `messages`)".into())
    }

    fn to_row(&self) -> Value {
        let mut row = Map::new();
        self.to_json(&mut row);
        Value::Object(row)
    }
}

impl Record for SftPair {
    fn from_row(row: &Map<String, Value>) -> Result<Self, String> {
        let prompt = Prompt::from_row(row)?;
        let completion = non_empty_string(required(row, "completion")?, "completion")?;
        let teacher_topk = match (
            row.get("teacher_topk_ids"),
            row.get("teacher_topk_logprobs"),
        ) {
            (None | Some(Value::Null), None | Some(Value::Null)) => None,
            (Some(ids), Some(lps)) => {
                let ids: Vec<Vec<u32>> = serde_json::from_value(ids.clone()).map_err(|_| {
                    "column `teacher_topk_ids` must be a list of lists of token ids".to_string()
                })?;
                let logprobs: Vec<Vec<f32>> =
                    serde_json::from_value(lps.clone()).map_err(|_| {
                        "column `teacher_topk_logprobs` must be a list of lists of numbers"
                            .to_string()
                    })?;
                if ids.len() != logprobs.len()
                    || ids.iter().zip(&logprobs).any(|(a, b)| a.len() != b.len())
                {
                    return Err(
                        "columns `teacher_topk_ids` and `teacher_topk_logprobs` differ in shape"
                            .into(),
                    );
                }
                if logprobs
                    .iter()
                    .flatten()
                    .any(|x| !x.is_finite() || *x > 1e-4)
                {
                    return Err("column `teacher_topk_logprobs` holds a value that is not a log-probability".into());
                }
                Some(TopK { ids, logprobs })
            }
            _ => {
                return Err(
                    "give both `teacher_topk_ids` and `teacher_topk_logprobs`, or neither".into(),
                );
            }
        };
        Ok(SftPair {
            prompt,
            completion,
            teacher_topk,
        })
    }

    fn to_row(&self) -> Value {
        let mut row = Map::new();
        self.prompt.to_json(&mut row);
        row.insert("completion".into(), self.completion.clone().into());
        if let Some(t) = &self.teacher_topk {
            row.insert("teacher_topk_ids".into(), json!(t.ids));
            row.insert("teacher_topk_logprobs".into(), json!(t.logprobs));
        }
        Value::Object(row)
    }
}

impl Record for Preference {
    fn from_row(row: &Map<String, Value>) -> Result<Self, String> {
        Ok(Preference {
            prompt: Prompt::from_row(row)?,
            chosen: non_empty_string(required(row, "chosen")?, "chosen")?,
            rejected: non_empty_string(required(row, "rejected")?, "rejected")?,
        })
    }

    fn to_row(&self) -> Value {
        let mut row = Map::new();
        self.prompt.to_json(&mut row);
        row.insert("chosen".into(), self.chosen.clone().into());
        row.insert("rejected".into(), self.rejected.clone().into());
        Value::Object(row)
    }
}

impl Record for TrainRecord {
    fn from_row(row: &Map<String, Value>) -> Result<Self, String> {
        match row.get("text") {
            Some(v) => Ok(TrainRecord::Text(non_empty_string(v, "text")?)),
            None => SftPair::from_row(row)
                .map(TrainRecord::Pair)
                .map_err(|e| format!("{e} (or a `text` column)")),
        }
    }

    fn to_row(&self) -> Value {
        match self {
            TrainRecord::Text(t) => json!({ "text": t }),
            TrainRecord::Pair(p) => p.to_row(),
        }
    }
}

fn required<'a>(row: &'a Map<String, Value>, column: &str) -> Result<&'a Value, String> {
    row.get(column)
        .ok_or_else(|| format!("missing column `{column}`"))
}

fn non_empty_string(v: &Value, column: &str) -> Result<String, String> {
    match v {
        Value::String(s) if !s.is_empty() => Ok(s.clone()),
        Value::String(_) => Err(format!("column `{column}` is empty")),
        other => Err(format!(
            "column `{column}` must be a string, found {}",
            kind(other)
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// JSONL text of a Parquet file, one line per row (nulls written as `null`).
fn parquet_to_jsonl(path: &Path) -> Result<String, DataError> {
    let err = |reason: String| DataError::File {
        path: path.to_path_buf(),
        reason,
    };
    let unreadable = |e: &dyn std::fmt::Display| err(format!("not a readable Parquet file: {e}"));
    let file = fs_err::File::open(path)?;
    let batches = ParquetRecordBatchReaderBuilder::try_new(file.into_parts().0)
        .and_then(|b| b.build())
        .map_err(|e| unreadable(&e))?;
    let mut writer = WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, LineDelimited>(Vec::new());
    for batch in batches {
        let batch = batch.map_err(|e| unreadable(&e))?;
        writer.write(&batch).map_err(|e| err(e.to_string()))?;
    }
    writer.finish().map_err(|e| err(e.to_string()))?;
    let out = writer.into_inner();
    String::from_utf8(out).map_err(|e| err(e.to_string()))
}

/// Parquet bytes (zstd) of JSONL text, the schema inferred from every row.
fn jsonl_to_parquet(text: &str) -> Result<Vec<u8>, ParquetError> {
    let (schema, _) = arrow_json::reader::infer_json_schema(Cursor::new(text), None)?;
    let schema = Arc::new(schema);
    let batches = arrow_json::ReaderBuilder::new(schema.clone()).build(Cursor::new(text))?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut writer = ArrowWriter::try_new(Vec::new(), schema, Some(properties))?;
    for batch in batches {
        writer.write(&batch?)?;
    }
    writer.into_inner()
}

/// A JSONL file's text, without the byte-order mark that spreadsheet
/// exports start with (CRLF line ends are dropped by `lines()`); a byte that
/// is not UTF-8 is reported with its line.
fn jsonl_text(path: &Path) -> Result<String, DataError> {
    let mut bytes = fs_err::read(path)?;
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        bytes.drain(..3);
    }
    String::from_utf8(bytes).map_err(|e| {
        let bytes = e.as_bytes();
        let at = e.utf8_error().valid_up_to();
        let line_start = bytes[..at]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        DataError::Line {
            path: path.to_path_buf(),
            row: bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1,
            reason: format!(
                "not valid UTF-8 (byte 0x{:02X} at column {})",
                bytes[at],
                at - line_start + 1
            ),
        }
    })
}

/// Reads every row of a JSONL or Parquet file as `T`.
pub fn read_records<T: Record>(path: &Path) -> Result<Vec<T>, DataError> {
    let format = Format::of(path)?;
    let text = match format {
        Format::Jsonl => jsonl_text(path)?,
        Format::Parquet => parquet_to_jsonl(path)?,
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if format == Format::Jsonl && line.trim().is_empty() {
            continue;
        }
        let err = |reason: String| match format {
            Format::Jsonl => DataError::Line {
                path: path.to_path_buf(),
                row: i + 1,
                reason,
            },
            Format::Parquet => DataError::Row {
                path: path.to_path_buf(),
                row: i + 1,
                reason,
            },
        };
        let value: Value =
            serde_json::from_str(line).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(err("expected a JSON object".into()));
        };
        out.push(T::from_row(&map).map_err(err)?);
    }
    if out.is_empty() {
        return Err(DataError::File {
            path: path.to_path_buf(),
            reason: "holds no rows".into(),
        });
    }
    Ok(out)
}

pub fn read_prompts(path: &Path) -> Result<Vec<Prompt>, DataError> {
    read_records(path)
}

/// Writes rows as JSONL or Parquet (by extension), atomically.
pub fn write_records<T: Record>(path: &Path, rows: &[T], overwrite: bool) -> Result<(), DataError> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&r.to_row().to_string());
        text.push('\n');
    }
    let bytes = match Format::of(path)? {
        Format::Jsonl => text.into_bytes(),
        Format::Parquet => jsonl_to_parquet(&text).map_err(|e| DataError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?,
    };
    Ok(write_atomic(path, &bytes, overwrite)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        fs_err::write(&path, text).unwrap();
        (dir, path)
    }

    fn roundtrip<T: Record + PartialEq + std::fmt::Debug>(rows: Vec<T>) {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("a.jsonl");
        let parquet = dir.path().join("a.parquet");
        write_records(&jsonl, &rows, false).unwrap();
        let back: Vec<T> = read_records(&jsonl).unwrap();
        assert_eq!(back, rows);
        write_records(&parquet, &back, false).unwrap();
        assert_eq!(&fs_err::read(&parquet).unwrap()[..4], b"PAR1");
        let again: Vec<T> = read_records(&parquet).unwrap();
        assert_eq!(again, rows);
        assert!(
            write_records(&parquet, &rows, false).is_err(),
            "no silent overwrite"
        );
    }

    #[test]
    fn every_record_kind_roundtrips_through_jsonl_and_parquet() {
        let conversation = Prompt::Messages(vec![
            Message {
                role: Role::User,
                content: "Hi <start_of_turn>".into(),
            },
            Message {
                role: Role::Model,
                content: "Hello.".into(),
            },
            Message {
                role: Role::User,
                content: "What is 2 plus 2?".into(),
            },
        ]);
        roundtrip(vec![
            Prompt::Text("What is two plus three?".into()),
            Prompt::Text("Reverse \"cat\".\nThanks".into()),
        ]);
        roundtrip(vec![conversation.clone()]);
        roundtrip(vec![
            SftPair {
                prompt: Prompt::Text("a".into()),
                completion: "b".into(),
                teacher_topk: Some(TopK {
                    ids: vec![vec![5, 6], vec![7, 1]],
                    logprobs: vec![vec![-0.25, -1.5], vec![-0.125, -3.0]],
                }),
            },
            SftPair {
                prompt: Prompt::Text("c".into()),
                completion: "d".into(),
                teacher_topk: Some(TopK {
                    ids: vec![vec![9, 2]],
                    logprobs: vec![vec![-0.5, -0.75]],
                }),
            },
        ]);
        roundtrip(vec![SftPair {
            prompt: conversation,
            completion: "4.".into(),
            teacher_topk: None,
        }]);
        roundtrip(vec![
            TrainRecord::Text("Plain text to model.".into()),
            TrainRecord::Text("More text.".into()),
        ]);
        roundtrip(vec![Preference {
            prompt: Prompt::Text("p".into()),
            chosen: "good".into(),
            rejected: "bad".into(),
        }]);
    }

    #[test]
    fn a_byte_order_mark_and_crlf_line_ends_are_read() {
        let text = "\u{feff}{\"prompt\": \"a\", \"completion\": \"b\"}\r\n{\"prompt\": \"c\", \"completion\": \"d\"}\r\n";
        let (_d, path) = file("p.jsonl", text);
        let rows = read_records::<SftPair>(&path).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].completion, "d");
    }

    #[test]
    fn a_byte_that_is_not_utf8_is_named_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        let mut bytes = b"{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"c".to_vec();
        bytes.extend([0xFF, b'"']);
        bytes.extend(b", \"completion\": \"d\"}\n");
        fs_err::write(&path, bytes).unwrap();
        let err = read_records::<SftPair>(&path).unwrap_err().to_string();
        assert!(
            err.contains("p.jsonl:2: not valid UTF-8 (byte 0xFF at column 14)"),
            "{err}"
        );
    }

    #[test]
    fn bad_jsonl_rows_name_file_and_line() {
        let cases: &[(&str, &str)] = &[
            (
                "{\"prompt\": \"ok\", \"completion\": \"x\"}\n{\"prompt\": 3, \"completion\": \"x\"}\n",
                "p.jsonl:2: column `prompt` must be a string, found a number",
            ),
            (
                "{\"prompt\": \"a\", \"completion\": \"\"}\n",
                "p.jsonl:1: column `completion` is empty",
            ),
            (
                "{\"prompt\": \"a\"}\n",
                "p.jsonl:1: missing column `completion`",
            ),
            (
                "{\"text\": \"x\", \"completion\": \"y\"}\n",
                "p.jsonl:1: missing column `prompt`",
            ),
            (
                "{\"prompt\": \"a\", \"completion\": \"b\"}\n{oops\n",
                "p.jsonl:2: not valid JSON",
            ),
            ("[1]\n", "p.jsonl:1: expected a JSON object"),
            ("\n", "p.jsonl: holds no rows"),
            (
                "{\"messages\": [{\"role\": \"system\", \"content\": \"x\"}], \"completion\": \"y\"}\n",
                "p.jsonl:1: column `messages`: unknown variant `system`",
            ),
            (
                "{\"messages\": [], \"completion\": \"y\"}\n",
                "p.jsonl:1: column `messages` is empty",
            ),
            (
                "{\"prompt\": \"a\", \"completion\": \"b\", \"teacher_topk_ids\": [[1]]}\n",
                "give both",
            ),
            (
                "{\"prompt\": \"a\", \"completion\": \"b\", \"teacher_topk_ids\": [[1, 2]], \"teacher_topk_logprobs\": [[-1.0]]}\n",
                "differ in shape",
            ),
            (
                "{\"prompt\": \"a\", \"completion\": \"b\", \"teacher_topk_ids\": [[1]], \"teacher_topk_logprobs\": [[0.5]]}\n",
                "not a log-probability",
            ),
            (
                "{\"prompt\": \"a\", \"completion\": \"b\", \"teacher_topk_ids\": [[-1]], \"teacher_topk_logprobs\": [[-0.5]]}\n",
                "list of lists of token ids",
            ),
        ];
        for (text, expected) in cases {
            let (_d, path) = file("p.jsonl", text);
            let err = read_records::<SftPair>(&path).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} does not contain {expected:?}"
            );
        }
    }

    #[test]
    fn bad_parquet_rows_name_file_and_row() {
        let dir = tempfile::tempdir().unwrap();
        // a Parquet file whose `chosen` column holds numbers
        let bytes =
            jsonl_to_parquet("{\"prompt\": \"a\", \"chosen\": 1, \"rejected\": \"x\"}\n").unwrap();
        let parquet = dir.path().join("prefs.parquet");
        fs_err::write(&parquet, bytes).unwrap();
        let err = read_records::<Preference>(&parquet)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("prefs.parquet: row 1: column `chosen` must be a string"),
            "{err}"
        );
        let err = read_records::<SftPair>(&parquet).unwrap_err().to_string();
        assert!(err.contains("row 1: missing column `completion`"), "{err}");

        let garbage = dir.path().join("bad.parquet");
        fs_err::write(&garbage, b"not parquet at all").unwrap();
        let err = read_records::<Prompt>(&garbage).unwrap_err().to_string();
        assert!(
            err.contains("bad.parquet: not a readable Parquet file"),
            "{err}"
        );
        let err = read_records::<Prompt>(&dir.path().join("x.csv"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported file type"), "{err}");
    }
}
