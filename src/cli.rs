//! Command-line definitions (parsing only; `main.rs` dispatches).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "posttrain",
    version,
    about = "The Gemma 2 post-training recipe (SFT with distillation, reward model, RLHF, WARP) on Burn",
    propagate_version = true
)]
pub struct Cli {
    /// Compute backend; GPU backends need the matching cargo feature.
    #[arg(long, global = true, env = "POSTTRAIN_BACKEND", value_enum, default_value_t = Backend::Flex)]
    pub backend: Backend,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// Burn's portable CPU backend (SIMD + threads); always built.
    Flex,
    /// Burn's ndarray CPU backend (feature `ndarray`; deprecated upstream in favour of flex).
    Ndarray,
    /// WebGPU through wgpu (WGSL shaders): Vulkan, Metal, DX12 (feature `wgpu`).
    Wgpu,
    /// Vulkan with SPIR-V shaders (feature `vulkan`).
    Vulkan,
    /// Apple Metal (feature `metal`).
    Metal,
    /// NVIDIA CUDA (feature `cuda`).
    Cuda,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show a checkpoint: config, parameter count, tensors, provenance.
    Inspect(InspectArgs),
    /// Sample completions from a causal LM checkpoint (JSONL out).
    Sample(SampleArgs),
    /// Load a checkpoint and write it back in Hugging Face layout (dtype, shards).
    Convert(ConvertArgs),
    /// Write the logits of a checkpoint for given token ids (to compare with a reference).
    Logits(LogitsArgs),
    /// Tokenizer utilities.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Measure training and sampling throughput (one JSON line per case).
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Checkpoint directory (config.json + model.safetensors or shards).
    pub dir: PathBuf,
    /// Print the table as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// Tokens to generate per prompt at most.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 keeps all.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 keeps all.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampling streams (one per prompt, by its row number).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    /// Checkpoint directory with tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL file of prompts (`prompt` or `messages` per line).
    #[arg(long, conflicts_with = "prompt", required_unless_present = "prompt")]
    pub prompts: Option<PathBuf>,
    /// One prompt given on the command line.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Output JSONL (default: stdout).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an existing output file.
    #[arg(long)]
    pub overwrite: bool,
    /// Feed the prompt text as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Debug, Args)]
pub struct LogitsArgs {
    /// Checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// safetensors file with an integer tensor `ids` [batch, len].
    #[arg(long)]
    pub ids: PathBuf,
    /// Output safetensors file with f32 `logits` [batch, len, vocab].
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output file.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Subcommand)]
pub enum TokenizerCommand {
    /// Train a BPE tokenizer.json with the Gemma control tokens as its first ids.
    Train(TokenizerTrainArgs),
}

#[derive(Debug, Args)]
pub struct TokenizerTrainArgs {
    /// Text files, one example per line.
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Vocabulary size, control tokens included.
    #[arg(long, default_value_t = 512)]
    pub vocab_size: usize,
    /// Output tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output file.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchShape {
    /// vocab 512, hidden 256, intermediate 1024, 4 layers, 4/2 heads, head_dim 64, window 64.
    Tiny,
    /// as tiny with hidden 512, intermediate 2048, 8 layers, 8/4 heads.
    Small,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchCase {
    /// AdamW steps of causal-LM cross-entropy.
    Train,
    /// KV-cached sampling (prefill included).
    Sample,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, num_args = 1.., default_values_t = [BenchShape::Tiny, BenchShape::Small])]
    pub shape: Vec<BenchShape>,
    #[arg(long, value_enum, num_args = 1.., default_values_t = [BenchCase::Train, BenchCase::Sample])]
    pub case: Vec<BenchCase>,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Sequence length of a training step.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Prompt length when sampling.
    #[arg(long, default_value_t = 16)]
    pub prompt: usize,
    /// New tokens when sampling.
    #[arg(long, default_value_t = 64)]
    pub new: usize,
    /// Timed repetitions (median reported).
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source checkpoint directory (single file or shards; f32, bf16 or f16).
    #[arg(long)]
    pub model: PathBuf,
    /// Output checkpoint directory (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Stored precision of the output weights.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Split the weights into this many shards (with model.safetensors.index.json); 1 = one file.
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Load the weights as a reward model (`score` head) instead of a causal LM.
    #[arg(long)]
    pub reward: bool,
    /// Replace an existing output directory.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
    F16,
}
