//! Record kinds with the column names Hugging Face TRL uses, read from JSONL.
//! Every bad row is reported with its file and 1-based line number.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::tokenizer::Message;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{path}:{line}: {reason}")]
    Row {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
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
                role: crate::tokenizer::Role::User,
                content: t.clone(),
            }],
            Prompt::Messages(m) => m.clone(),
        }
    }
}

fn check_extension(path: &Path) -> Result<(), DataError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") | Some("json") => Ok(()),
        _ => Err(DataError::File {
            path: path.to_path_buf(),
            reason: "unsupported file type (expected .jsonl)".into(),
        }),
    }
}

/// Parses each non-empty line of a JSONL file with `row`.
pub fn read_jsonl<T>(
    path: &Path,
    row: impl Fn(&serde_json::Map<String, Value>) -> Result<T, String>,
) -> Result<Vec<T>, DataError> {
    check_extension(path)?;
    let text = fs_err::read_to_string(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |reason: String| DataError::Row {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        let value: Value =
            serde_json::from_str(line).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(err("expected a JSON object".into()));
        };
        out.push(row(&map).map_err(err)?);
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
    read_jsonl(path, prompt_of_row)
}

fn prompt_of_row(map: &serde_json::Map<String, Value>) -> Result<Prompt, String> {
    if let Some(v) = map.get("prompt") {
        return match v {
            Value::String(s) if !s.is_empty() => Ok(Prompt::Text(s.clone())),
            Value::String(_) => Err("column `prompt` is empty".into()),
            other => Err(format!(
                "column `prompt` must be a string, found {}",
                kind(other)
            )),
        };
    }
    if let Some(v) = map.get("messages") {
        let messages: Vec<Message> =
            serde_json::from_value(v.clone()).map_err(|e| format!("column `messages`: {e}"))?;
        if messages.is_empty() {
            return Err("column `messages` is empty".into());
        }
        return Ok(Prompt::Messages(messages));
    }
    Err("missing column `prompt` (or `messages`)".into())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        fs_err::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn reads_prompts_and_messages() {
        let (_d, path) = file(
            "{\"prompt\": \"hi\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"yo\"}]}\n",
        );
        let p = read_prompts(&path).unwrap();
        assert_eq!(p[0], Prompt::Text("hi".into()));
        assert_eq!(p[1].display(), "yo");
    }

    #[test]
    fn bad_rows_name_file_and_line() {
        for (text, expected) in [
            (
                "{\"prompt\": \"ok\"}\n{\"prompt\": 3}\n",
                "p.jsonl:2: column `prompt` must be a string, found a number",
            ),
            (
                "{\"prompt\": \"\"}\n",
                "p.jsonl:1: column `prompt` is empty",
            ),
            ("{\"text\": \"x\"}\n", "p.jsonl:1: missing column `prompt`"),
            ("{\"prompt\": \"a\"}\n{oops\n", "p.jsonl:2: not valid JSON"),
            ("[1]\n", "p.jsonl:1: expected a JSON object"),
            ("\n", "p.jsonl: holds no rows"),
            (
                "{\"messages\": [{\"role\": \"system\", \"content\": \"x\"}]}\n",
                "p.jsonl:1: column `messages`: unknown variant `system`",
            ),
        ] {
            let (_d, path) = file(text);
            let err = read_prompts(&path).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} does not contain {expected}");
        }
    }
}
