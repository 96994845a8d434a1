//! Records, file formats, the tokenizer and the Gemma chat template.
//! No ML framework here: everything is plain data.

pub mod tokenizer;

pub use tokenizer::{ChatTokenizer, Message, Role, TokenizerError};
