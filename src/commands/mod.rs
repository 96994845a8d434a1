pub mod bench;
pub mod convert;
pub mod inspect;
pub mod logits;
pub mod sample;
pub mod tokenizer;
