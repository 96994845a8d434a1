//! Property test standing in for fuzzing: the safetensors loader takes
//! damaged files (bytes flipped, cut, header lengths changed) without
//! panicking or allocating what the file cannot hold.

use std::path::Path;

use posttrain_model::Weights;
use proptest::prelude::*;

fn fixture() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/gemma2-tiny/model.safetensors");
    std::fs::read(path).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn damaged_checkpoints_are_refused_or_read(
        flips in prop::collection::vec((0usize..4096, any::<u8>()), 0..6),
        cut in prop::option::of(0usize..1_000_000),
        header_len in prop::option::of(any::<u64>()),
    ) {
        let mut bytes = fixture();
        for (at, value) in flips {
            let i = at % bytes.len();
            bytes[i] = value;
        }
        if let Some(n) = header_len {
            bytes[..8].copy_from_slice(&n.to_le_bytes());
        }
        if let Some(c) = cut {
            bytes.truncate(c % (bytes.len() + 1));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(w) = Weights::open_file(&path) {
            let names: Vec<String> = w.names().map(str::to_string).collect();
            for name in names {
                match w.read(&name) {
                    Ok(t) => prop_assert_eq!(t.data.len(), t.shape.iter().product::<usize>()),
                    Err(e) => prop_assert!(e.to_string().contains("model.safetensors"), "{}", e),
                }
            }
        }
    }
}
