//! Property tests standing in for fuzzing: the record readers and the chat
//! template take arbitrary input without panicking, and what they accept
//! is consistent.

use posttrain_datasets::{ChatTokenizer, Message, Role, TrainRecord, read_records};
use proptest::prelude::*;

fn tokenizer() -> ChatTokenizer {
    let corpus = [
        "What is one plus two? One plus two is three.",
        "Reverse the word cat.",
        "user\nmodel\n",
    ];
    ChatTokenizer::train(corpus.iter(), 64).unwrap()
}

/// JSON-ish lines: fragments of valid rows, broken up and glued together.
fn jsonish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("\"prompt\": ".to_string()),
        Just("\"completion\": ".to_string()),
        Just("\"messages\": [".to_string()),
        Just("{\"role\": \"user\", \"content\": \"hi\"}".to_string()),
        Just("\"teacher_topk_ids\": [[1, 2]]".to_string()),
        Just("\"teacher_topk_logprobs\": [[-0.5, -1e40]]".to_string()),
        Just("\"text\": ".to_string()),
        Just(", ".to_string()),
        Just("]".to_string()),
        Just("null".to_string()),
        Just("\n".to_string()),
        "\"[^\"\\\\]{0,12}\"",
        "-?[0-9]{1,4}(\\.[0-9]{1,3})?",
        "[\\x00-\\x7f]{0,6}",
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn jsonl_reader_never_panics(text in jsonish()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.jsonl");
        std::fs::write(&path, &text).unwrap();
        match read_records::<TrainRecord>(&path) {
            // whatever is accepted has at least one row, each a pair or text
            Ok(rows) => prop_assert!(!rows.is_empty()),
            // a refusal is one line naming the file
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains("rows.jsonl"), "{}", msg);
                prop_assert!(!msg.contains('\n'), "{}", msg);
            }
        }
    }

    #[test]
    fn jsonl_reader_takes_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.jsonl");
        std::fs::write(&path, &bytes).unwrap();
        let _ = read_records::<TrainRecord>(&path);
    }

    #[test]
    fn chat_template_renders_any_text(prompt in "\\PC{0,40}", completion in "\\PC{0,40}") {
        let tok = tokenizer();
        let messages = vec![Message { role: Role::User, content: prompt }];
        let prompt_ids = tok.render_prompt(&messages).unwrap();
        let ex = tok.render_example(&messages, &completion).unwrap();
        prop_assert!(ex.ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
        // the example starts with the rendered prompt and ends its turn
        prop_assert_eq!(&ex.ids[..prompt_ids.len()], &prompt_ids[..]);
        prop_assert_eq!(*ex.ids.last().unwrap(), tok.end_of_turn);
        prop_assert_eq!(ex.target.len(), ex.ids.len());
        prop_assert!(ex.target[..prompt_ids.len()].iter().all(|t| !t));
    }
}
