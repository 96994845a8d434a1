//! The training loop every stage runs: one flat `for step` loop. A stage
//! supplies its mathematics through [`Stage::loss`]: the loss of one share
//! of one micro-batch, with its weight and statistics. The loop owns the
//! rest: drawing batches and splitting them over ranks, gradient
//! accumulation and each share's weight in the gradient, the optimizer and
//! its schedule, the statistics' reduction over ranks and micro-batches,
//! resume, the stop on a non-finite loss, the first/last loss, metrics,
//! progress and the resumable state. The parameters it trains are gathered in
//! one place, [`Optimizer::backward`].

use std::ops::Range;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::Tensor;
use posttrain_datasets::Epochs;
use serde_json::Value;

use crate::state::StateError;
use crate::{MetricsLog, OptimConfig, Optimizer, Progress, Resume, Saver, StepStats};
use posttrain_dist::world;

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("loss is not finite ({loss}) at step {step}: lower --lr or check the {blame}")]
    NotFinite {
        step: usize,
        loss: f64,
        blame: &'static str,
    },
    #[error("writing metrics")]
    Io(#[from] std::io::Error),
    #[error("resumable state")]
    State(#[from] StateError),
    #[error("stopped by {} after step {step}", crate::stop::name(*signal))]
    Stopped { signal: i32, step: usize },
}

/// First and last step loss of a run (NaN before the first step).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossSummary {
    #[serde(default = "nan")]
    pub first_loss: f64,
    #[serde(default = "nan")]
    pub last_loss: f64,
}

fn nan() -> f64 {
    f64::NAN
}

impl Default for LossSummary {
    fn default() -> Self {
        Self {
            first_loss: f64::NAN,
            last_loss: f64::NAN,
        }
    }
}

/// A run's report: the loop's loss summary and wall time beside the stage's
/// own report `R` (one JSON object; `report.field` reads `R`'s fields).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Run<R> {
    #[serde(flatten)]
    pub loss: LossSummary,
    /// Seconds of this process's part of the run.
    #[serde(default)]
    pub seconds: f64,
    #[serde(flatten)]
    pub stage: R,
}

impl<R> std::ops::Deref for Run<R> {
    type Target = R;
    fn deref(&self) -> &R {
        &self.stage
    }
}

impl<R> std::ops::DerefMut for Run<R> {
    fn deref_mut(&mut self) -> &mut R {
        &mut self.stage
    }
}

/// What a stage computes on its share of one micro-batch.
pub struct Share {
    /// The mean loss over the share's `weight` units (target tokens, pairs,
    /// samples).
    pub loss: Tensor<1>,
    pub weight: f64,
    /// Tokens the share processed (progress and tokens/s).
    pub tokens: u64,
    /// Means over the share's units, in the order of [`Stage::MEANS`]
    /// (`None`: not computed for this micro-batch).
    pub means: Vec<Option<f64>>,
    /// Counts, in the order of [`Stage::COUNTS`].
    pub counts: Vec<f64>,
    /// Values per unit, in the order of [`Stage::VALUES`].
    pub values: Vec<Vec<f64>>,
}

impl Share {
    /// A share with no statistics.
    pub fn new(loss: Tensor<1>, weight: f64, tokens: u64) -> Self {
        Self {
            loss,
            weight,
            tokens,
            means: Vec::new(),
            counts: Vec::new(),
            values: Vec::new(),
        }
    }
}

impl Share {
    /// With per-unit values in the order of [`Stage::VALUES`].
    pub fn with_values(self, values: Vec<Vec<f64>>) -> Self {
        Self { values, ..self }
    }
}

/// Where a share sits in the run.
#[derive(Debug, Clone, Copy)]
pub struct At {
    pub step: usize,
    /// The micro-batch within the step.
    pub micro: usize,
    pub micro_batches: usize,
    /// This process's rank.
    pub rank: usize,
    /// The share's first row (or unit) within the micro-batch: where its
    /// rows' random streams start, so that they do not depend on the ranks.
    pub first: usize,
}

impl At {
    /// The micro-batch's number in the run.
    pub fn index(&self) -> u64 {
        (self.step * self.micro_batches + self.micro) as u64
    }
}

/// A step's rows drawn for a stage that prepares them once per step: the
/// whole batch and this rank's part of it.
pub struct Draw<'a> {
    pub all: &'a [usize],
    pub share: Range<usize>,
}

impl Draw<'_> {
    pub fn rows(&self) -> &[usize] {
        &self.all[self.share.clone()]
    }
}

/// A finished step as its metrics row sees it: the statistics of
/// [`Share`] over every rank and micro-batch.
pub struct Step<'a> {
    pub step: usize,
    /// The mean micro-batch loss.
    pub loss: f64,
    /// Tokens of every rank.
    pub tokens: u64,
    pub epoch: u64,
    pub optim: &'a StepStats,
    names: [&'static [&'static str]; 3],
    means: Vec<Option<f64>>,
    counts: Vec<f64>,
    values: Vec<Vec<f64>>,
}

impl Step<'_> {
    fn at(&self, kind: usize, name: &str) -> usize {
        self.names[kind]
            .iter()
            .position(|n| *n == name)
            .unwrap_or_else(|| panic!("{name} is not one of the stage's statistics"))
    }

    /// The mean over the micro-batches that computed it.
    pub fn mean(&self, name: &str) -> Option<f64> {
        self.means[self.at(0, name)]
    }

    /// The sum over ranks and micro-batches.
    pub fn count(&self, name: &str) -> f64 {
        self.counts[self.at(1, name)]
    }

    /// Every rank's values in rank order.
    pub fn values(&self, name: &str) -> &[f64] {
        &self.values[self.at(2, name)]
    }
}

/// What a stage does in the shared loop.
pub trait Stage<M: Module> {
    type Report: serde::Serialize + serde::de::DeserializeOwned + Default;
    type Error: From<LoopError>;

    /// Names of the means, counts and per-unit values a [`Share`] carries.
    const MEANS: &'static [&'static str] = &[];
    const COUNTS: &'static [&'static str] = &[];
    const VALUES: &'static [&'static str] = &[];

    /// The name in progress lines.
    fn name(&self) -> &str;

    /// What to check when the loss is not finite ("data", "reward model").
    fn blame(&self) -> &'static str {
        "data"
    }

    /// `None`: each micro-batch is a batch of rows drawn from the data.
    /// `Some(k)`: one batch is drawn per step and [`Stage::prepare`] makes
    /// `k` units of each row (RLHF's samples); the micro-batches split the
    /// units in whole groups of `k`.
    fn units_per_row(&self) -> Option<usize> {
        None
    }

    /// Prepares this rank's rows of a step's batch (when
    /// [`Stage::units_per_row`] is `Some`).
    fn prepare(&mut self, _step: usize, _draw: Draw<'_>, _model: &M) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The loss of one share of one micro-batch: `rows` are the data's rows,
    /// or the prepared units, never empty.
    fn loss(&mut self, at: At, rows: &[usize], model: &M) -> Result<Share, Self::Error>;

    /// Runs right after the optimizer step (RLHF moves its anchor).
    fn after_update(&mut self, _model: &M) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The step's metrics row.
    fn metrics(
        &mut self,
        step: &Step<'_>,
        report: &mut Run<Self::Report>,
    ) -> Result<StepLog, Self::Error>;

    /// Evaluates into `row`; returns a line for the log.
    fn evaluate(
        &mut self,
        _step: usize,
        _model: &M,
        _row: &mut serde_json::Map<String, Value>,
        _report: &mut Self::Report,
    ) -> Result<Option<String>, Self::Error> {
        Ok(None)
    }

    /// Runs after the row is logged, on rank 0 alone (RLHF writes its
    /// snapshots).
    fn after_log(&mut self, _done: usize, _model: &M) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Modules the stage keeps besides the model, saved with the state.
    fn extra(&self) -> Vec<(&str, &M)> {
        Vec::new()
    }
}

/// A step's metrics row, a line for the log, and why the run stops here.
#[derive(Default)]
pub struct StepLog {
    pub row: serde_json::Map<String, Value>,
    pub line: Option<String>,
    pub stop: Option<String>,
}

impl StepLog {
    /// A row from a `json!` object, with no line and no stop.
    ///
    /// # Panics
    /// When `row` is not an object.
    pub fn of(row: Value) -> Self {
        let Value::Object(row) = row else {
            panic!("a metrics row is a JSON object, got {row}")
        };
        Self {
            row,
            ..Self::default()
        }
    }
}

/// The optimizer and its schedule, the data, and how often the loop
/// evaluates (`eval_every` steps and after the last one; 0: never).
pub struct Schedule<'a> {
    pub optim: &'a OptimConfig,
    /// Rows in seeded batches: one batch per micro-batch (or per step).
    pub data: Epochs,
    pub eval_every: usize,
    /// Seeds the device's random stream at every step (LoRA dropout), so a
    /// resumed run draws what the unbroken one did.
    pub seed: u64,
}

impl<'a> Schedule<'a> {
    /// Length-bucketed batches of `batch_size` rows of `lengths` tokens, in
    /// an order seeded by `seed` as the step's random streams are.
    pub fn new(
        optim: &'a OptimConfig,
        (lengths, batch_size): (Vec<usize>, usize),
        eval_every: usize,
        seed: u64,
    ) -> Self {
        Self {
            optim,
            data: Epochs::new(lengths, batch_size, seed),
            eval_every,
            seed,
        }
    }
}

/// Back-propagates a step's micro-batch losses; refuses a non-finite loss
/// before it reaches the gradients.
struct Backward<'a, M> {
    optim: &'a mut Optimizer<M>,
    step: usize,
    blame: &'static str,
    sum: f64,
    count: usize,
    /// This rank's part `W_r / W` of the last micro-batch.
    fraction: f64,
}

impl<M: Module> Backward<'_, M> {
    /// Back-propagates the loss of this rank's share of a micro-batch: the
    /// mean over `weight` units. With `N` ranks, `L = Σ_r L_r·W_r / W` with
    /// `W = Σ_r W_r` is the loss one process computes on the whole
    /// micro-batch, so each rank back-propagates `L_r·W_r / W` and the
    /// gradients' sum over the ranks is one process's gradient.
    fn share(&mut self, model: &M, loss: Tensor<1>, weight: f64) -> Result<(), LoopError> {
        let w = world();
        if w.size() == 1 {
            self.record(loss.clone().into_scalar::<f64>())?;
            self.optim.backward(model, loss);
            return Ok(());
        }
        let mut total = [weight];
        w.sum_f64(&mut total);
        self.fraction = if total[0] > 0.0 {
            weight / total[0]
        } else {
            0.0
        };
        let share = loss.mul_scalar(self.fraction);
        let mut value = [share.clone().into_scalar::<f64>()];
        w.sum_f64(&mut value);
        self.record(value[0])?;
        self.optim.backward(model, share);
        Ok(())
    }

    /// Takes part in a micro-batch where this rank's share is empty.
    fn empty(&mut self) -> Result<(), LoopError> {
        let w = world();
        w.sum_f64(&mut [0.0]); // the weight
        self.fraction = 0.0;
        let mut loss = [0.0];
        w.sum_f64(&mut loss);
        self.record(loss[0])
    }

    /// Counts a micro-batch's loss, refusing a non-finite one.
    fn record(&mut self, value: f64) -> Result<(), LoopError> {
        if !value.is_finite() {
            return Err(LoopError::NotFinite {
                step: self.step + 1,
                loss: value,
                blame: self.blame,
            });
        }
        self.sum += value;
        self.count += 1;
        Ok(())
    }
}

/// A step's statistics while its micro-batches run.
struct Sums {
    tokens: u64,
    /// `(sum over micro-batches, micro-batches that computed it)`.
    means: Vec<(f64, usize)>,
    counts: Vec<f64>,
    values: Vec<Vec<f64>>,
}

impl Sums {
    fn new(names: [&[&str]; 3]) -> Self {
        Self {
            tokens: 0,
            means: vec![(0.0, 0); names[0].len()],
            counts: vec![0.0; names[1].len()],
            values: vec![Vec::new(); names[2].len()],
        }
    }

    /// Adds a micro-batch's means: each rank's weighted by its part of the
    /// micro-batch (`None`: this rank's share is empty).
    fn add_means(&mut self, fraction: f64, means: Option<&[Option<f64>]>) {
        if self.means.is_empty() {
            return;
        }
        let n = self.means.len();
        let at = |i: usize| means.and_then(|m| m.get(i).copied().flatten());
        let mut values: Vec<f64> = (0..n).map(|i| at(i).unwrap_or(0.0)).collect();
        let mut seen: Vec<f64> = (0..n)
            .map(|i| f64::from(u8::from(at(i).is_some())))
            .collect();
        let w = world();
        if w.size() > 1 {
            values.iter_mut().for_each(|v| *v *= fraction);
            w.sum_f64(&mut values);
        }
        w.sum_f64(&mut seen);
        for ((acc, v), s) in self.means.iter_mut().zip(values).zip(seen) {
            if s > 0.0 {
                acc.0 += v;
                acc.1 += 1;
            }
        }
    }

    fn add(&mut self, tokens: u64, counts: &[f64], values: Vec<Vec<f64>>) {
        self.tokens += tokens;
        for (c, v) in self.counts.iter_mut().zip(counts) {
            *c += v;
        }
        for (all, v) in self.values.iter_mut().zip(values) {
            all.extend(v);
        }
    }

    /// Every rank's tokens, counts and values.
    fn gather(mut self) -> Self {
        let w = world();
        let mut totals: Vec<f64> = std::iter::once(self.tokens as f64)
            .chain(self.counts.iter().copied())
            .collect();
        w.sum_f64(&mut totals);
        self.tokens = totals[0] as u64;
        self.counts = totals[1..].to_vec();
        self.values = self.values.iter().map(|v| w.all_gather_f64(v)).collect();
        self
    }
}

/// Runs one share: its loss back-propagated, its statistics summed.
fn run_share<M: Module, S: Stage<M>>(
    stage: &mut S,
    at: At,
    rows: &[usize],
    model: &M,
    backward: &mut Backward<'_, M>,
    sums: &mut Sums,
) -> Result<(), S::Error> {
    if rows.is_empty() {
        backward.empty()?;
        sums.add_means(0.0, None);
        return Ok(());
    }
    let Share {
        loss,
        weight,
        tokens,
        means,
        counts,
        values,
    } = stage.loss(at, rows, model)?;
    backward.share(model, loss, weight)?;
    sums.add_means(backward.fraction, Some(&means));
    sums.add(tokens, &counts, values);
    Ok(())
}

/// Trains `model` through `stage`; with `resume` it continues a saved run
/// (the model given is the saved one), and `saver` stores the state.
pub fn train<M: Module, S: Stage<M>>(
    stage: &mut S,
    mut model: M,
    schedule: Schedule<'_>,
    log: &mut MetricsLog,
    resume: Option<&Resume>,
    mut saver: Option<Saver<'_, M>>,
) -> Result<(M, Run<S::Report>), S::Error> {
    let steps = schedule.optim.steps;
    let micro_batches = schedule.optim.accumulation.max(1);
    let mut data = schedule.data;
    let mut optim = Optimizer::new(schedule.optim);
    let mut progress = Progress::new(stage.name(), steps as u64, "steps");
    let mut report = Run::<S::Report>::default();
    let start = Instant::now();
    let mut first_step = 0;
    if let Some(r) = resume {
        report = r.restore(&mut optim).map_err(LoopError::from)?;
        data.seek(r.state.epoch, r.state.next);
        first_step = r.state.step;
        progress.advance(first_step as u64, 0);
    }

    crate::stop::stop_after_the_step();
    let devices = model.devices();
    let names = [S::MEANS, S::COUNTS, S::VALUES];
    let w = world();
    // ranks draw their own streams (dropout on their own rows)
    let rank = w.rank() as u64;
    for step in first_step..steps {
        for device in &devices {
            let stream = schedule.seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            device.seed(stream ^ rank.wrapping_mul(0xD1B5_4A32_D192_ED03));
        }
        let step_start = Instant::now();
        // micro-batches → this rank's shares → losses → backward (gradients accumulate)
        let mut backward = Backward {
            optim: &mut optim,
            step,
            blame: stage.blame(),
            sum: 0.0,
            count: 0,
            fraction: 1.0,
        };
        let mut sums = Sums::new(names);
        let at = |micro, first| At {
            step,
            micro,
            micro_batches,
            rank: w.rank(),
            first,
        };
        match stage.units_per_row() {
            None => {
                for micro in 0..micro_batches {
                    let all = data.next_batch();
                    let share = w.share(all.len());
                    let (at, rows) = (at(micro, share.start), &all[share]);
                    run_share(stage, at, rows, &model, &mut backward, &mut sums)?;
                }
            }
            Some(k) => {
                // one batch a step, its units in whole groups per micro-batch
                let all = data.next_batch();
                let share = w.share(all.len());
                let units = share.len() * k;
                let draw_first = share.start * k;
                let draw = Draw { all: &all, share };
                stage.prepare(step, draw, &model)?;
                let per_micro = k * (units / k.max(1)).div_ceil(micro_batches).max(1);
                // every rank takes part in as many micro-batches as the others
                let rounds = if w.size() == 1 {
                    units.div_ceil(per_micro)
                } else {
                    micro_batches
                };
                for micro in 0..rounds {
                    let rows: Vec<usize> =
                        (micro * per_micro..((micro + 1) * per_micro).min(units)).collect();
                    let at = at(micro, draw_first + micro * per_micro);
                    run_share(stage, at, &rows, &model, &mut backward, &mut sums)?;
                }
            }
        }
        let loss = backward.sum / backward.count.max(1) as f64;
        let sums = sums.gather();

        // global-norm clip → AdamW step at the schedule's rate, then the stage's own update
        let (next, stats) = optim.step(step, model);
        model = next;
        stage.after_update(&model)?;
        let step_s = step_start.elapsed().as_secs_f64();

        // loss summary and the metrics row
        if step == 0 {
            report.loss.first_loss = loss;
        }
        report.loss.last_loss = loss;
        let done = Step {
            step,
            loss,
            tokens: sums.tokens,
            epoch: data.epoch,
            optim: &stats,
            names,
            means: sums
                .means
                .iter()
                .map(|&(s, n)| (n > 0).then(|| s / n as f64))
                .collect(),
            counts: sums.counts,
            values: sums.values,
        };
        let StepLog {
            mut row,
            line,
            stop,
        } = stage.metrics(&done, &mut report)?;
        row.insert("step_s".into(), step_s.into());
        if w.size() > 1 {
            row.insert("all_reduce_s".into(), stats.all_reduce_s.into());
        }

        // evaluation when due, on rank 0 (the one that logs)
        let due = (step + 1) % schedule.eval_every.max(1) == 0 || step + 1 == steps;
        if schedule.eval_every > 0
            && due
            && w.is_root()
            && let Some(line) = stage.evaluate(step, &model, &mut row, &mut report.stage)?
        {
            progress.println(&line);
        }
        log.log(&Value::Object(row)).map_err(LoopError::from)?;
        if let Some(line) = line {
            progress.println(&line);
        }
        progress.advance(1, done.tokens);
        if w.is_root() {
            stage.after_log(step + 1, &model)?;
        }

        // resumable state when due, or now when a signal asks the run to stop
        let signal = (step + 1 < steps).then(crate::stop::agreed).flatten();
        if let Some(s) = saver.as_mut() {
            let saved = serde_json::to_value(&report).map_err(StateError::from);
            let saved = saved.map_err(LoopError::from)?;
            let position = (data.epoch, data.next);
            let extra = stage.extra();
            match signal {
                Some(_) => s.save_now(step + 1, position, saved, &model, &optim, &extra),
                None => s.after_step(step + 1, steps, position, saved, &model, &optim, &extra),
            }
            .map_err(LoopError::from)?;
        }
        if let Some(signal) = signal {
            // no rank ends (and has mpirun end the others) before rank 0 saved
            w.sum_f64(&mut [0.0]);
            progress.finish();
            crate::stop::mark_stopped(step + 1);
            return Err(LoopError::Stopped {
                signal,
                step: step + 1,
            }
            .into());
        }
        if let Some(why) = stop {
            progress.println(&why);
            break;
        }
    }
    progress.finish();
    report.seconds = start.elapsed().as_secs_f64();
    Ok((model, report))
}
