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

    /// Pad every batch to a multiple of N tokens (masked: results do not change). GPU backends
    /// compile and autotune kernels per shape, so a few lengths bound their number
    /// [default: 1 on CPU backends, 32 on GPU backends]
    #[arg(long, global = true, env = "POSTTRAIN_LENGTH_MULTIPLE", value_parser = clap::value_parser!(u64).range(1..))]
    pub length_multiple: Option<u64>,

    /// Where sampling draws its tokens: `host` reads each step's logits back and draws from the
    /// exact distribution; `device` draws by Gumbel-max on the device and reads back only the
    /// token ids (same distribution, other samples for the same seed; greedy decoding is the
    /// same) [default: host on CPU backends, device on GPU backends]
    #[arg(long, global = true, env = "POSTTRAIN_SAMPLE_ON", value_enum)]
    pub sample_on: Option<SampleOn>,

    #[command(subcommand)]
    pub command: Command,
}

impl Backend {
    /// Whether kernels are compiled per shape at run time.
    pub fn compiles_kernels(self) -> bool {
        !matches!(self, Backend::Flex | Backend::Ndarray)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SampleOn {
    Host,
    Device,
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
    /// Data: the embedded English task, its ground-truth scorer, preference pairs.
    #[command(subcommand)]
    Data(DataCommand),
    /// Write a new, randomly initialised checkpoint (config + tokenizer + seed).
    Init(InitArgs),
    /// Train a causal LM from new weights (optionally distilled from a teacher).
    Pretrain(PretrainArgs),
    /// Supervised fine-tuning on prompt/completion pairs with distillation (stored top-k, live teacher, on-policy GKD).
    Sft(SftArgs),
    /// Train a reward model (Bradley-Terry) on preference pairs; ~10x the policy by default.
    Reward(RewardArgs),
    /// Direct preference optimisation (DPO, or IPO) of a policy on preference pairs against a frozen reference.
    Dpo(DpoArgs),
    /// Odds-ratio preference optimisation (ORPO): SFT on the chosen side plus an odds-ratio preference term, no reference model.
    Orpo(OrpoArgs),
    /// Score prompt/completion rows with a reward model (JSONL or Parquet out).
    Score(RewardScoreArgs),
    /// Write SFT pairs with a teacher's completions (and top-k log-probs).
    Generate(GenerateArgs),
    /// Show a checkpoint: config, parameter count, tensors, provenance and its lineage back to the roots.
    Inspect(InspectArgs),
    /// Sample completions from a causal LM checkpoint (JSONL out).
    Sample(SampleArgs),
    /// Load a checkpoint and write it back in Hugging Face layout (dtype, shards).
    Convert(ConvertArgs),
    /// Write the logits of a checkpoint for given token ids (to compare with a reference).
    Logits(LogitsArgs),
    /// Policy-gradient RLHF: REINFORCE with a leave-one-out baseline, KL to an EMA anchor (WARP stage 1).
    Rlhf(RlhfArgs),
    /// WARP weight averaging: per-layer SLERP of task vectors, LITI towards the init, EMA.
    #[command(subcommand)]
    Warp(WarpCommand),
    /// Evaluate checkpoints: reward-model score, true score, KL to a reference, length (one table).
    Eval(EvalArgs),
    /// Charts (PNG + SVG) and index.html from run directories: losses, RLHF reward and KL, KL-reward Pareto plots.
    Report(ReportArgs),
    /// Tokenizer utilities.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Measure training and sampling throughput, MFU and the matmul peak (one JSON line per case).
    Bench(BenchArgs),
}

/// Where a stage writes its checkpoint.
#[derive(Debug, Args)]
pub struct CheckpointOut {
    /// Output checkpoint directory (appears whole when done; an existing one is refused unless --overwrite).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output.
    #[arg(long)]
    pub overwrite: bool,
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
    pub frozen: FrozenArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// How a frozen model's matrices are held in memory; every product computes in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightsDtype {
    /// bf16 when the checkpoint stores bf16 or f16, else f32.
    Auto,
    F32,
    /// Every matrix in bf16 (half of f32).
    Bf16,
    /// The seven projections in 8 bits, one scale per 64 elements; embedding and norms as stored.
    Int8,
    /// The seven projections in 4-bit NF4 (QLoRA), one scale per 64 elements; embedding and norms as stored.
    Nf4,
}

/// The frozen models a command loads (teacher, reference, reward model, sampled checkpoints).
#[derive(Debug, Args)]
pub struct FrozenArgs {
    /// How frozen models hold their matrices in memory (teacher, references, reward model, sampled checkpoints).
    #[arg(long, value_enum, default_value_t = WeightsDtype::Auto)]
    pub weights_dtype: WeightsDtype,
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
    /// How the model holds its matrices (default f32: the reference logits).
    #[arg(long, value_enum, default_value_t = WeightsDtype::F32)]
    pub weights_dtype: WeightsDtype,
}

#[derive(Debug, Subcommand)]
pub enum TokenizerCommand {
    /// Train a BPE tokenizer.json with the Gemma control tokens as its first ids.
    Train(TokenizerTrainArgs),
    /// Print the ids posttrain feeds a model for a conversation (JSON), ending with the opening of the model's turn.
    Encode(TokenizerEncodeArgs),
}

#[derive(Debug, Args)]
pub struct TokenizerEncodeArgs {
    /// tokenizer.json (or a checkpoint directory holding one).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// The conversation: a JSON list of {"role": "user"|"assistant"|"model", "content": …}.
    #[arg(long)]
    pub messages: String,
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
    /// An fp32 2048³ matmul through the backend: the practical peak that MFU is measured against.
    Matmul,
    /// Memory read rate (a 512 MiB f32 buffer summed by one thread per core, best of 10): the bound a decoding step, which reads every weight once, runs against.
    Bandwidth,
    /// `rlhf` steps (the stage's own loop: RLOO, KL to an EMA anchor, the task's scorer as reward) split into rollout / reward / reference log-probs / update, as TRL's RLOOTrainer is measured.
    RlhfStep,
    /// `reward` steps (Bradley–Terry on random pairs through the stage's own loop), as TRL's RewardTrainer is measured.
    RewardStep,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, num_args = 1.., default_values_t = [BenchShape::Tiny, BenchShape::Small])]
    pub shape: Vec<BenchShape>,
    #[arg(long, value_enum, num_args = 1.., default_values_t = [BenchCase::Train, BenchCase::Sample, BenchCase::Matmul])]
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
    /// rlhf-step: prompts per step.
    #[arg(long, default_value_t = 2)]
    pub prompts_per_step: usize,
    /// rlhf-step: samples per prompt.
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    /// rlhf-step: new tokens per sample at most.
    #[arg(long, default_value_t = 32)]
    pub rl_new: usize,
    /// reward-step: preference pairs per step.
    #[arg(long, default_value_t = 8)]
    pub pairs: usize,
    /// reward-step: tokens of a pair's longest side. Chosen sides take
    /// `pair-len − 16 ..= pair-len` tokens (uniform), rejected sides
    /// `pair-len − 8`, and a batch pads to its longest row: the lengths
    /// `bench_trl.py`'s reward data tokenizes to at 40.
    #[arg(long, default_value_t = 40)]
    pub pair_len: usize,
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Peak GFLOP/s for MFU; by default the 2048³ matmul rate is measured first (best of 10).
    #[arg(long)]
    pub peak_gflops: Option<f64>,
    /// Memory read GB/s for sampling's bandwidth bound; by default measured first (`--case bandwidth`) when sampling is benchmarked.
    #[arg(long)]
    pub peak_gbs: Option<f64>,
    /// sample: this checkpoint (held as --weights-dtype says) instead of random weights of --shape.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub frozen: FrozenArgs,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source checkpoint directory (single file or shards; f32, bf16 or f16).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub output: CheckpointOut,
    /// Stored precision of the output weights.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Split the weights into this many shards (with model.safetensors.index.json); 1 = one file.
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Load the weights as a reward model (`score` head) instead of a causal LM.
    #[arg(long)]
    pub reward_model: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
    F16,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Write the embedded task: train/eval pairs and prompts, tokenizer.json, teacher and student configs.
    Synth(SynthArgs),
    /// Score completions (`prompt`, `completion`) with the task's ground-truth scorer.
    Score(ScoreArgs),
    /// Preference pairs for the embedded task: policies sample, the ground-truth scorer labels.
    Prefs(PrefsArgs),
}

#[derive(Debug, Args)]
pub struct PrefsArgs {
    /// Checkpoints that write the candidate completions (e.g. the SFT student and the teacher).
    #[arg(long, required = true, num_args = 1..)]
    pub policy: Vec<PathBuf>,
    /// Prompts of the embedded task (JSONL or Parquet).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Output preferences `prompt`/`chosen`/`rejected` (JSONL or Parquet).
    #[arg(long)]
    pub out: PathBuf,
    /// Completions per prompt from each policy.
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    /// Pairs kept per prompt, largest score gap first (1: its best against its worst).
    #[arg(long, default_value_t = 1)]
    pub pairs_per_prompt: usize,
    /// Probability that a pair's labels are swapped (rater noise).
    #[arg(long, default_value_t = 0.0)]
    pub label_noise: f64,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub frozen: FrozenArgs,
}

#[derive(Debug, Args)]
pub struct RewardArgs {
    /// The policy this reward model is for (its config sets the size ratio's base and the tokenizer).
    #[arg(long)]
    pub policy: PathBuf,
    /// Start from this (larger) checkpoint's trunk, e.g. the teacher; a new `score` head unless it has one.
    #[arg(long, conflicts_with = "size_ratio")]
    pub init: Option<PathBuf>,
    /// New weights about R times the policy's parameter count (width and depth scaled).
    #[arg(long, default_value_t = 10.0)]
    pub size_ratio: f64,
    /// Preference pairs (JSONL or Parquet: `prompt` or `messages`, `chosen`, `rejected`).
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out preference pairs for pairwise accuracy.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    #[command(flatten)]
    pub output: CheckpointOut,
    /// m in −log σ(r⁺ − r⁻ − m).
    #[arg(long, default_value_t = 0.0)]
    pub margin: f64,
    /// Seed of a new `score` head (or of all new weights without --init); default: --seed. Reward models meant for one WARM average (`warp average`) share it and differ in --seed (data order).
    #[arg(long)]
    pub head_seed: Option<u64>,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DpoLossArg {
    /// −(1−ε)·log σ(h) − ε·log σ(−h) (DPO).
    Sigmoid,
    /// (h/β − 1/(2β))² (IPO).
    Ipo,
}

#[derive(Debug, Args)]
pub struct DpoArgs {
    /// The policy to train (with tokenizer.json), e.g. the SFT checkpoint.
    #[arg(long)]
    pub policy: PathBuf,
    /// Preference pairs (JSONL or Parquet: `prompt` or `messages`, `chosen`, `rejected`).
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out preference pairs for the implicit reward's accuracy and margin.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// The frozen reference (default: the policy as it starts).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// β: scale of the implicit reward β·(log π − log π_ref).
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// The preference loss on the margin h.
    #[arg(long, value_enum, default_value_t = DpoLossArg::Sigmoid)]
    pub loss: DpoLossArg,
    /// ε: the share of pairs taken as mislabelled by the sigmoid loss.
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    #[command(flatten)]
    pub output: CheckpointOut,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub frozen: FrozenArgs,
}

/// A finite number ≥ 0.
fn non_negative(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if x >= 0.0 && x.is_finite() => Ok(x),
        _ => Err(format!("expected a non-negative number, got {text}")),
    }
}

#[derive(Debug, Args)]
pub struct OrpoArgs {
    /// The policy to train (with tokenizer.json), e.g. a base or SFT checkpoint.
    #[arg(long)]
    pub policy: PathBuf,
    /// Preference pairs (JSONL or Parquet: `prompt` or `messages`, `chosen`, `rejected`).
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out preference pairs for the loss, accuracy and margin of the implicit rewards λ·ℓ.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// λ: weight of the odds-ratio term −log σ(log odds(chosen) − log odds(rejected)).
    #[arg(long, default_value_t = 0.1, value_parser = non_negative)]
    pub lambda: f64,
    #[command(flatten)]
    pub output: CheckpointOut,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Debug, Args)]
pub struct RewardScoreArgs {
    /// Reward model checkpoint (with tokenizer.json).
    #[arg(long)]
    pub reward: PathBuf,
    /// Rows with `prompt` (or `messages`) and `completion` (JSONL or Parquet).
    #[arg(long, required_unless_present = "pairs", conflicts_with = "pairs")]
    pub input: Option<PathBuf>,
    /// Preference pairs (`chosen`/`rejected`) instead: prints their pairwise accuracy and
    /// reward-gap statistics as one JSON line, as the reward stage's held-out eval does.
    #[arg(long)]
    pub pairs: Option<PathBuf>,
    /// Output rows with a `reward` column (JSONL or Parquet); default stdout JSONL.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub frozen: FrozenArgs,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Training pairs (at most what the task's distinct questions leave after eval).
    #[arg(long, default_value_t = 3000)]
    pub train: usize,
    /// Held-out pairs (prompts disjoint from training).
    #[arg(long, default_value_t = 200)]
    pub eval: usize,
    /// Largest operand of the arithmetic and comparison questions (30: ~3,400 distinct
    /// questions; 99: ~26,000).
    #[arg(long, default_value_t = posttrain_datasets::task::DEFAULT_MAX_NUMBER)]
    pub max_number: u32,
    /// Tokenizer vocabulary size (control tokens included).
    #[arg(long, default_value_t = 512)]
    pub vocab_size: usize,
    /// Replace an existing output directory.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// JSONL or Parquet with `prompt` and `completion`.
    #[arg(long)]
    pub input: PathBuf,
    /// Per-row scores (JSONL or Parquet); the summary always goes to stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LossOnArg {
    /// The completion and its closing `<end_of_turn>`.
    Completion,
    /// Every token.
    All,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Optimizer steps.
    #[arg(long, default_value_t = 600)]
    pub steps: usize,
    /// Examples per micro-batch (reward: preference pairs); a step takes --grad-accum of them.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 50)]
    pub warmup: usize,
    #[command(flatten)]
    pub adam: AdamArgs,
    /// Eval loss (and task score) every N steps and at the end; 0: off.
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save resumable state (weights, optimizer, data position, metrics) to OUT.state every N steps (0: never).
    #[arg(long, default_value_t = 200)]
    pub save_state_every: usize,
    /// Continue from OUT.state when it exists (same settings and inputs), else start afresh.
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub memory: MemoryArgs,
}

/// What a training stage trains and how it fits in memory: LoRA, the
/// memory check, activation checkpointing.
#[derive(Debug, Args)]
pub struct MemoryArgs {
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Start even when the memory estimate exceeds the available memory.
    #[arg(long)]
    pub force: bool,
    /// Recompute memory-bound activations (norms, GELU, soft-caps, softmax) in the backward pass instead of keeping them.
    #[arg(long)]
    pub checkpoint_activations: bool,
    /// A LoRA run's frozen base: auto keeps a 16-bit checkpoint's matrices in bf16 on the CPU (half the memory, products widen them block by block); f32 holds them widened (faster, twice the memory); int8 / nf4 hold the seven projections in 8 / 4 bits (QLoRA), widened block by block in each product.
    #[arg(long, value_enum, default_value = "auto")]
    pub base_dtype: WeightsDtype,
}

/// LoRA: low-rank adapters trained on a frozen base; the output is then a
/// PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`).
#[derive(Debug, Args)]
pub struct LoraArgs {
    /// LoRA rank r (positive); without it every weight trains (full fine-tuning).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA α: the update B·A is scaled by α/r.
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f64,
    /// Projections to adapt: q, k, v, o, gate, up, down (or q_proj, …).
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    pub lora_targets: Vec<String>,
    /// Dropout on the adapters' input while training (seeded per step).
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
}

impl LoraArgs {
    /// `None` without `--lora-rank`; the settings checked otherwise.
    pub fn config(&self) -> anyhow::Result<Option<posttrain_model::LoraConfig>> {
        let rank = match self.lora_rank {
            None => return Ok(None),
            Some(0) => {
                anyhow::bail!("--lora-rank must be positive (leave it out to train every weight)")
            }
            Some(r) => r,
        };
        let targets = self
            .lora_targets
            .iter()
            .map(|t| {
                let t = t.trim();
                if t.ends_with("_proj") {
                    t.to_string()
                } else {
                    format!("{t}_proj")
                }
            })
            .collect();
        let cfg = posttrain_model::LoraConfig {
            rank,
            alpha: self.lora_alpha,
            targets,
            dropout: self.lora_dropout,
        };
        cfg.check().map_err(anyhow::Error::msg)?;
        Ok(Some(cfg))
    }
}

/// What the causal-LM stages (`pretrain`, `sft`) add to the training flags.
#[derive(Debug, Args)]
pub struct LmArgs {
    /// Eval prompts completed greedily and scored at each eval (embedded task only; 0: off).
    #[arg(long, default_value_t = 64)]
    pub eval_samples: usize,
    /// Longest greedy eval completion.
    #[arg(long, default_value_t = 32)]
    pub eval_max_new_tokens: usize,
    /// Cut sequences longer than the context instead of failing.
    #[arg(long)]
    pub truncate: bool,
}

/// AdamW and the schedule's tail, shared by every training stage.
#[derive(Debug, Args)]
pub struct AdamArgs {
    /// Cosine decay ends at lr × this.
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.95)]
    pub beta2: f64,
    /// Clip gradients to this global L2 norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Micro-batches accumulated per optimizer step (rlhf: the step's prompts split in this many parts).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
}

#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// Model config.json (HF Gemma2Config) for the new weights.
    #[arg(long)]
    pub config: PathBuf,
    /// tokenizer.json (copied into the checkpoint).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Training data (JSONL or Parquet): `text` rows, or `prompt`/`completion` pairs.
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out rows (same kinds) for the eval loss.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    #[command(flatten)]
    pub output: CheckpointOut,
    /// Distil from this checkpoint: (1-α)·CE + α·τ²·KL(teacher ‖ student).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    #[command(flatten)]
    pub distill: DistillArgs,
    /// Which tokens are trained on.
    #[arg(long, value_enum, default_value_t = LossOnArg::Completion)]
    pub loss_on: LossOnArg,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub lm: LmArgs,
    #[command(flatten)]
    pub frozen: FrozenArgs,
}

#[derive(Debug, Args)]
pub struct DistillArgs {
    /// Weight α of the distillation term: (1-α)·CE + α·τ²·KL.
    #[arg(long, default_value_t = 1.0)]
    pub alpha: f64,
    /// Distillation temperature τ.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Model config.json (HF Gemma2Config).
    #[arg(long)]
    pub config: PathBuf,
    /// tokenizer.json (copied into the checkpoint).
    #[arg(long)]
    pub tokenizer: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub output: CheckpointOut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KdArg {
    /// live with --teacher, else topk when every row has teacher top-k, else none.
    Auto,
    /// Cross-entropy only.
    None,
    /// The stored `teacher_topk_*` columns.
    Topk,
    /// The --teacher's full distribution, computed in the step.
    Live,
}

#[derive(Debug, Args)]
pub struct SftArgs {
    /// Student checkpoint to fine-tune (with tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt/completion pairs (JSONL or Parquet), optionally with `teacher_topk_*`.
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out pairs for the eval loss and (embedded task) the score of greedy samples.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    #[command(flatten)]
    pub output: CheckpointOut,
    /// Teacher checkpoint for live and on-policy distillation (same tokenizer).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Distillation source.
    #[arg(long, value_enum, default_value_t = KdArg::Auto)]
    pub kd: KdArg,
    /// With --kd topk: one more bucket for the teacher mass outside its top-k.
    #[arg(long)]
    pub topk_rest: bool,
    #[command(flatten)]
    pub distill: DistillArgs,
    /// λ: probability that a batch's completions are sampled from the student and trained with JSD_β against the teacher (GKD).
    #[arg(long, default_value_t = 0.0)]
    pub on_policy_fraction: f64,
    /// β of the generalized JSD: 0 forward KL, 1 reverse KL.
    #[arg(long, default_value_t = 0.5)]
    pub gkd_beta: f64,
    /// Sampling temperature of the student's on-policy completions.
    #[arg(long, default_value_t = 1.0)]
    pub on_policy_temperature: f32,
    /// Longest on-policy completion.
    #[arg(long, default_value_t = 32)]
    pub on_policy_max_new_tokens: usize,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub lm: LmArgs,
    #[command(flatten)]
    pub frozen: FrozenArgs,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Teacher checkpoint directory with tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Prompts (JSONL or Parquet: `prompt` or `messages`).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Output SFT pairs (JSONL or Parquet).
    #[arg(long)]
    pub out: PathBuf,
    /// Also store the teacher's top-K token ids and log-probs per completion token (0: off).
    #[arg(long, default_value_t = 0)]
    pub topk: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub frozen: FrozenArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AnchorArg {
    /// θ_ema ← (1−μ)θ_ema + μθ after every step (WARP).
    Ema,
    /// The fixed SFT policy.
    Sft,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AdvantageArg {
    /// Leave-one-out: r_i − mean_{j≠i} r_j (RLOO, WARP).
    Rloo,
    /// Group-normalised: (r_i − mean_j r_j) / (std_j r_j + 1e-4) (GRPO).
    Grpo,
    /// Group-centred: r_i − mean_j r_j (Dr. GRPO).
    DrGrpo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KlEstimatorArg {
    /// −log ρ (its sum is the sequence log-ratio).
    K1,
    /// ρ − 1 − log ρ (non-negative, lower variance).
    K3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KlInArg {
    /// r − β·Σ_t k_t, a constant for the gradient (WARP).
    Reward,
    /// + β·mean_i Σ_t k_t in the loss, differentiated (GRPO).
    Loss,
}

#[derive(Debug, Args)]
pub struct RlhfArgs {
    /// SFT policy to start from (and the KL reference of --anchor sft).
    #[arg(long)]
    pub policy: PathBuf,
    /// Reward model checkpoint.
    #[arg(long, required_unless_present = "task_reward")]
    pub reward: Option<PathBuf>,
    /// Reward with the embedded task's ground-truth scorer instead of a reward model.
    #[arg(long, conflicts_with = "reward")]
    pub task_reward: bool,
    /// Prompts (JSONL or Parquet: `prompt` or `messages`).
    #[arg(long)]
    pub prompts: PathBuf,
    #[command(flatten)]
    pub output: CheckpointOut,
    /// Also write the final anchor checkpoint here.
    #[arg(long)]
    pub anchor_out: Option<PathBuf>,
    /// Also keep the policy every N steps, as `OUT/snapshots/step-N` (the reward-KL trajectory; 0: off).
    #[arg(long, default_value_t = 0)]
    pub snapshot_every: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Prompts per step.
    #[arg(long, default_value_t = 16)]
    pub prompts_per_step: usize,
    /// K: samples per prompt (leave-one-out baseline over them).
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    #[command(flatten)]
    pub adam: AdamArgs,
    /// Rollout sampling temperature.
    #[arg(long, default_value_t = 0.9)]
    pub temperature: f32,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// β: weight of the KL to the anchor (in the shaped reward, or in the loss with --kl-in loss).
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// Baseline of the policy gradient over a prompt's K samples.
    #[arg(long, value_enum, default_value_t = AdvantageArg::Rloo)]
    pub advantage: AdvantageArg,
    /// Per-token KL estimator, with ρ = π_anchor/π_θ.
    #[arg(long, value_enum, default_value_t = KlEstimatorArg::K1)]
    pub kl_estimator: KlEstimatorArg,
    /// Where the KL term enters.
    #[arg(long, value_enum, default_value_t = KlInArg::Reward)]
    pub kl_in: KlInArg,
    /// μ: EMA rate of the anchor.
    #[arg(long, default_value_t = 0.01)]
    pub mu: f64,
    /// What the KL pulls towards.
    #[arg(long, value_enum, default_value_t = AnchorArg::Ema)]
    pub anchor: AnchorArg,
    /// Reward subtracted per completion token.
    #[arg(long, default_value_t = 0.0)]
    pub length_penalty: f64,
    /// Stop once the mean KL to the SFT policy exceeds this (nats per completion).
    #[arg(long)]
    pub max_kl: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sequences per forward pass of the reward model and of the anchor's and init's log-probs
    /// (the training batch is --prompts-per-step × --samples).
    #[arg(long, default_value_t = 64)]
    pub score_batch_size: usize,
    /// Save resumable state (policy, anchor, optimizer, data position, metrics, snapshots) to OUT.state every N steps (0: never).
    #[arg(long, default_value_t = 50)]
    pub save_state_every: usize,
    /// Continue from OUT.state when it exists (same settings and inputs), else start afresh.
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub frozen: FrozenArgs,
}

#[derive(Debug, Subcommand)]
pub enum WarpCommand {
    /// Merge RL policies: per-layer SLERP of their task vectors, then LITI θ_η = (1−η)θ_init + ηθ_slerp.
    Merge(WarpMergeArgs),
    /// One EMA step on checkpoints: θ_ema ← (1−μ)θ_ema + μθ.
    Ema(WarpEmaArgs),
    /// WARM: the weight average Σ w_m·θ_m of models fine-tuned from one initialisation (e.g. reward models).
    Average(WarpAverageArgs),
}

#[derive(Debug, Args)]
pub struct WarpAverageArgs {
    /// The checkpoints to average (M ≥ 2, one config and tensor set; causal LMs or reward models).
    #[arg(long, required = true, num_args = 1..)]
    pub models: Vec<PathBuf>,
    /// w_m per model, comma-separated, normalised to sum 1 (default: uniform 1/M).
    #[arg(long, value_delimiter = ',')]
    pub weights: Option<Vec<f64>>,
    #[command(flatten)]
    pub output: CheckpointOut,
}

#[derive(Debug, Args)]
pub struct WarpMergeArgs {
    /// The checkpoint the policies were trained from (task vectors are θ_m − θ_init).
    #[arg(long)]
    pub init: PathBuf,
    /// The policies to merge (M ≥ 1; M > 2 merges recursively with λ = 1/m).
    #[arg(long, required = true, num_args = 1..)]
    pub policies: Vec<PathBuf>,
    /// η of LITI, one value or a comma-separated sweep, each in [0, 1] (0: the init, 1: the SLERP merge itself).
    #[arg(long, value_delimiter = ',', default_value = "0.3")]
    pub eta: Vec<f64>,
    /// Accept η outside [0, 1]: extrapolate beyond the init or the merge.
    #[arg(long)]
    pub allow_extrapolation: bool,
    /// Output checkpoint; with several η, a directory holding one `eta-<η>` checkpoint per value.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Args)]
pub struct WarpEmaArgs {
    /// The current EMA checkpoint.
    #[arg(long)]
    pub anchor: PathBuf,
    /// The policy it moves towards.
    #[arg(long)]
    pub policy: PathBuf,
    /// μ: the EMA rate.
    #[arg(long, default_value_t = 0.01)]
    pub mu: f64,
    #[command(flatten)]
    pub output: CheckpointOut,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Causal LM checkpoints to evaluate.
    #[arg(long, required = true, num_args = 1..)]
    pub checkpoints: Vec<PathBuf>,
    /// Held-out prompts (JSONL or Parquet).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Reward model for the RM score column.
    #[arg(long)]
    pub reward: Option<PathBuf>,
    /// Reference policy for the KL column (e.g. the SFT policy).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Samples per prompt.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Sampling temperature (1: the policy's own distribution, so the KL estimate is unbiased).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Also write the table as rows (JSONL or Parquet).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub frozen: FrozenArgs,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Run directories, searched for checkpoints with metrics.jsonl and for `eval` tables.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Output directory (index.html, *.png, *.svg).
    #[arg(long)]
    pub out: PathBuf,
    /// Moving-average window of the per-step curves (training loss, RLHF reward and KL).
    #[arg(long, default_value_t = 20)]
    pub smooth: usize,
    #[arg(long)]
    pub overwrite: bool,
}
