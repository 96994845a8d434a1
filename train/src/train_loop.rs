//! The training loop every stage runs: one flat `for step` loop. A stage
//! supplies what differs through [`Stage`]: how it draws its micro-batches
//! and computes their losses, what it does after the optimizer step (RLHF's
//! EMA anchor), its metrics row and evaluation, and modules it keeps besides
//! the model. The loop owns the rest: the optimizer and its schedule, resume,
//! the stop on a non-finite loss, the first/last loss, metrics, progress and
//! the resumable state. The parameters it trains are gathered in one place,
//! [`Optimizer::backward`].

use std::time::Instant;

use burn::module::Module;
use burn::tensor::Tensor;
use serde_json::Value;

use crate::state::StateError;
use crate::{LoopState, MetricsLog, OptimConfig, Optimizer, Progress, Resume, Saver, StepStats};
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

/// What a stage reports: the loop keeps its loss summary and wall time.
pub trait Report: serde::Serialize + serde::de::DeserializeOwned {
    fn loss_summary(&mut self) -> &mut LossSummary;
    /// Seconds of this process's part of the run.
    fn set_seconds(&mut self, seconds: f64);
}

/// Back-propagates a step's micro-batch losses, each divided by the number
/// of micro-batches; refuses a non-finite loss before it reaches the
/// gradients.
pub struct Backward<'a, M> {
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
    /// mean over `weight` units (target tokens, pairs, samples). With `N`
    /// ranks, `L = Σ_r L_r·W_r / W` with `W = Σ_r W_r` is the loss one
    /// process computes on the whole micro-batch, so each rank
    /// back-propagates `L_r·W_r / W` and the gradients' sum over the ranks
    /// is one process's gradient. Returns `L`, the same on every rank.
    pub fn backward_share(
        &mut self,
        model: &M,
        loss: Tensor<1>,
        weight: f64,
    ) -> Result<f64, LoopError> {
        let w = world();
        if w.size() == 1 {
            return self.backward_value(model, loss, None);
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
        self.backward_value(model, share, Some(value[0]))
    }

    /// Takes part in a micro-batch where this rank's share is empty.
    pub fn empty_share(&mut self) -> Result<f64, LoopError> {
        let w = world();
        w.sum_f64(&mut [0.0]); // the weight
        self.fraction = 0.0;
        let mut loss = [0.0];
        w.sum_f64(&mut loss);
        self.record(loss[0])
    }

    /// Turns this rank's means over its share of the last micro-batch into
    /// the means over the whole micro-batch, the same on every rank.
    pub fn combine(&self, means: &mut [f64]) {
        let w = world();
        if w.size() > 1 {
            means.iter_mut().for_each(|m| *m *= self.fraction);
            w.sum_f64(means);
        }
    }

    fn backward_value(
        &mut self,
        model: &M,
        loss: Tensor<1>,
        global: Option<f64>,
    ) -> Result<f64, LoopError> {
        let value = self.record(global.unwrap_or_else(|| loss.clone().into_scalar::<f64>()))?;
        self.optim.backward(model, loss);
        Ok(value)
    }

    /// Counts a micro-batch's loss, refusing a non-finite one.
    fn record(&mut self, value: f64) -> Result<f64, LoopError> {
        if !value.is_finite() {
            return Err(LoopError::NotFinite {
                step: self.step + 1,
                loss: value,
                blame: self.blame,
            });
        }
        self.sum += value;
        self.count += 1;
        Ok(value)
    }
}

/// What a stage does in the shared loop.
pub trait Stage<M: Module> {
    type Report: Report;
    type Error: From<LoopError>;

    /// The name in progress lines.
    fn name(&self) -> &str;

    /// What to check when the loss is not finite ("data", "reward model").
    fn blame(&self) -> &'static str {
        "data"
    }

    fn report(&mut self) -> &mut Self::Report;

    /// Continues a saved run: its report so far and its loop state.
    fn restore(&mut self, report: Self::Report, state: &LoopState) -> Result<(), Self::Error>;

    /// Draws step `step`'s micro-batches and back-propagates each one's loss
    /// through `backward`; returns the tokens the step processed.
    fn forward_backward(
        &mut self,
        step: usize,
        model: &M,
        backward: &mut Backward<'_, M>,
    ) -> Result<u64, Self::Error>;

    /// Runs right after the optimizer step (RLHF moves its anchor).
    fn after_update(&mut self, _model: &M) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The step's metrics row, from its mean micro-batch loss and the
    /// optimizer's statistics.
    fn metrics(
        &mut self,
        step: usize,
        loss: f64,
        stats: &StepStats,
    ) -> Result<StepLog, Self::Error>;

    /// Evaluates into `row`; returns a line for the log.
    fn evaluate(
        &mut self,
        _step: usize,
        _model: &M,
        _row: &mut serde_json::Map<String, Value>,
    ) -> Result<Option<String>, Self::Error> {
        Ok(None)
    }

    /// Runs after the row is logged (RLHF writes its snapshots).
    fn after_log(&mut self, _done: usize, _model: &M) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The data position `(epoch, next)` to continue from.
    fn position(&self) -> (u64, usize);

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

/// The optimizer and its schedule, and how often the loop evaluates
/// (`eval_every` steps and after the last one; 0: never).
pub struct Schedule<'a> {
    pub optim: &'a OptimConfig,
    pub eval_every: usize,
    /// Seeds the device's random stream at every step (LoRA dropout), so a
    /// resumed run draws what the unbroken one did.
    pub seed: u64,
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
) -> Result<M, S::Error> {
    let steps = schedule.optim.steps;
    let mut optim = Optimizer::new(schedule.optim);
    let mut progress = Progress::new(stage.name(), steps as u64, "steps");
    let start = Instant::now();
    let mut first_step = 0;
    if let Some(r) = resume {
        let report = r.restore(&mut optim).map_err(LoopError::from)?;
        stage.restore(report, &r.state)?;
        first_step = r.state.step;
        progress.advance(first_step as u64, 0);
    }

    let devices = model.devices();
    // ranks draw their own streams (dropout on their own rows)
    let rank = world().rank() as u64;
    for step in first_step..steps {
        for device in &devices {
            let stream = schedule.seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            device.seed(stream ^ rank.wrapping_mul(0xD1B5_4A32_D192_ED03));
        }
        let step_start = Instant::now();
        // micro-batches → losses → backward (gradients accumulate)
        let mut backward = Backward {
            optim: &mut optim,
            step,
            blame: stage.blame(),
            sum: 0.0,
            count: 0,
            fraction: 1.0,
        };
        let tokens = stage.forward_backward(step, &model, &mut backward)?;
        let loss = backward.sum / backward.count.max(1) as f64;

        // global-norm clip → AdamW step at the schedule's rate, then the stage's own update
        let (next, stats) = optim.step(step, model);
        model = next;
        stage.after_update(&model)?;
        let step_s = step_start.elapsed().as_secs_f64();

        // loss summary and the metrics row
        let summary = stage.report().loss_summary();
        if step == 0 {
            summary.first_loss = loss;
        }
        summary.last_loss = loss;
        let StepLog {
            mut row,
            line,
            stop,
        } = stage.metrics(step, loss, &stats)?;
        row.insert("step_s".into(), step_s.into());
        if world().size() > 1 {
            row.insert("all_reduce_s".into(), stats.all_reduce_s.into());
        }

        // evaluation when due, on rank 0 (the one that logs)
        let due = (step + 1) % schedule.eval_every.max(1) == 0 || step + 1 == steps;
        if schedule.eval_every > 0
            && due
            && world().is_root()
            && let Some(line) = stage.evaluate(step, &model, &mut row)?
        {
            progress.println(&line);
        }
        log.log(&Value::Object(row)).map_err(LoopError::from)?;
        if let Some(line) = line {
            progress.println(&line);
        }
        progress.advance(1, tokens);
        stage.after_log(step + 1, &model)?;

        // resumable state when due
        if let Some(s) = saver.as_mut() {
            let report = serde_json::to_value(&*stage.report()).map_err(StateError::from);
            let report = report.map_err(LoopError::from)?;
            let position = stage.position();
            let extra = stage.extra();
            s.after_step(step + 1, steps, position, report, &model, &optim, &extra)
                .map_err(LoopError::from)?;
        }
        if let Some(why) = stop {
            progress.println(&why);
            break;
        }
    }
    progress.finish();
    stage.report().set_seconds(start.elapsed().as_secs_f64());
    Ok(model)
}
