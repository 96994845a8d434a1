//! Records, file formats, the tokenizer and the Gemma chat template, and the
//! embedded English task. No ML framework here: everything is plain data.

pub mod batch;
pub mod chat_template;
pub mod records;
pub mod task;
pub mod tokenizer;

pub use batch::{Epochs, Example, LossOn, Overflow, bucketed_batches, encode_records};
pub use chat_template::{ChatTemplate, TemplateError};
pub use records::{
    DataError, Preference, Prompt, Record, SftPair, TopK, TrainRecord, read_prompts, read_records,
    write_records,
};
pub use tokenizer::{ChatTokenizer, Message, Role, TokenizerError};
