//! Learning-rate schedule: linear warmup from 0 to `peak` over `warmup`
//! steps, then cosine decay to `peak · min_ratio` at step `total`.
//!
//! `lr(s) = peak · (s+1)/warmup` for `s < warmup`, else
//! `peak · (min_ratio + (1 − min_ratio) · ½(1 + cos(π · (s − warmup)/(total − warmup))))`.

pub fn warmup_cosine(step: usize, total: usize, warmup: usize, peak: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cosine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_to_the_floor() {
        let lr = |s| warmup_cosine(s, 110, 10, 1e-3, 0.1);
        assert!((lr(0) - 1e-4).abs() < 1e-12);
        assert!((lr(9) - 1e-3).abs() < 1e-12);
        assert!((lr(10) - 1e-3).abs() < 1e-12);
        // halfway through the decay: floor + half the range
        assert!((lr(60) - (1e-4 + 0.5 * 9e-4)).abs() < 1e-12);
        assert!((lr(110) - 1e-4).abs() < 1e-12);
        assert!((lr(500) - 1e-4).abs() < 1e-12);
        assert!((1..110).all(|s| lr(s) <= lr(s - 1) + 1e-15 || s <= 9));
    }
}
