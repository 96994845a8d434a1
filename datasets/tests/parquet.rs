//! Parquet files written by pyarrow (the writer behind Hugging Face `datasets`), in the codecs
//! real datasets use, read as the rows they hold (fixtures made by `fixtures/parquet/make.py`),
//! and rows written here read back by the same reader.

use std::path::{Path, PathBuf};

use parquet::basic::Compression;
use parquet::file::reader::{FileReader, SerializedFileReader};
use posttrain_datasets::{
    Message, Preference, Prompt, Role, SftPair, TopK, read_records, write_records,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parquet")
        .join(name)
}

fn message(role: Role, content: &str) -> Message {
    Message {
        role,
        content: content.into(),
    }
}

#[test]
fn snappy_and_brotli_pairs_with_nested_top_k_over_two_row_groups() {
    let expected = vec![
        SftPair {
            prompt: Prompt::Text("What is 2 + 2?".into()),
            completion: "4.".into(),
            teacher_topk: Some(TopK {
                ids: vec![vec![10, 11], vec![12, 13]],
                logprobs: vec![vec![-0.25, -1.5], vec![-0.5, -1.0]],
            }),
        },
        SftPair {
            prompt: Prompt::Text("Name a colour.".into()),
            completion: "Blue, like the sky ☁.".into(),
            teacher_topk: Some(TopK {
                ids: vec![vec![20, 21]],
                logprobs: vec![vec![-0.125, -2.0]],
            }),
        },
    ];
    for name in ["sft_snappy.parquet", "sft_brotli.parquet"] {
        let rows: Vec<SftPair> = read_records(&fixture(name)).unwrap();
        assert_eq!(rows, expected, "{name}");
    }
}

#[test]
fn zstd_preferences_over_a_conversation_of_structs_and_large_strings() {
    let rows: Vec<Preference> = read_records(&fixture("prefs_messages_zstd.parquet")).unwrap();
    assert_eq!(
        rows,
        vec![Preference {
            prompt: Prompt::Messages(vec![
                message(Role::User, "Hi."),
                message(Role::Model, "Hello!"),
                message(Role::User, "Say it in French."),
            ]),
            chosen: "Bonjour !".into(),
            rejected: "Hello!".into(),
        }]
    );
}

#[test]
fn gzip_dictionary_prompts_beside_a_null_column() {
    let rows: Vec<Prompt> = read_records(&fixture("prompts_dictionary_gzip.parquet")).unwrap();
    let texts: Vec<&str> = rows.iter().map(Prompt::display).collect();
    assert_eq!(texts, ["Count to three.", "Count to three.", "Spell cat."]);
}

#[test]
fn written_parquet_is_zstd_and_reads_back() {
    let rows: Vec<SftPair> = read_records(&fixture("sft_snappy.parquet")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.parquet");
    write_records(&out, &rows, false).unwrap();
    let bytes = fs_err::read(&out).unwrap();
    assert_eq!(
        (&bytes[..4], &bytes[bytes.len() - 4..]),
        (&b"PAR1"[..], &b"PAR1"[..])
    );
    let reader = SerializedFileReader::new(std::fs::File::open(&out).unwrap()).unwrap();
    let column = reader.metadata().row_group(0).column(0);
    assert!(
        matches!(column.compression(), Compression::ZSTD(_)),
        "{:?}",
        column.compression()
    );
    assert_eq!(read_records::<SftPair>(&out).unwrap(), rows);
}

#[test]
fn a_file_that_is_not_parquet_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.parquet");
    let mut bytes = fs_err::read(fixture("sft_snappy.parquet")).unwrap();
    bytes.truncate(bytes.len() / 2);
    fs_err::write(&path, bytes).unwrap();
    let e = read_records::<SftPair>(&path).unwrap_err().to_string();
    assert!(
        e.contains("broken.parquet") && e.contains("not a readable Parquet file"),
        "{e}"
    );
}
