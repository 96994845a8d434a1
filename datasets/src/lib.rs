//! Records, file formats, the tokenizer and the Gemma chat template.
//! No ML framework here: everything is plain data.

pub mod records;
pub mod tokenizer;

pub use records::{DataError, Prompt, read_jsonl, read_prompts};
pub use tokenizer::{ChatTokenizer, Message, Role, TokenizerError};
