//! `eˣ` in f32 for loops the compiler vectorises: `x = n·ln 2 + r` with
//! `|r| ≤ ln2/2` (Cody–Waite split of ln 2), `eʳ ≈ 1 + r + r²·P(r)` with
//! Cephes' degree-5 minimax `P`, and `2ⁿ` built in the exponent bits.
//! Within 2 ulp of the correctly rounded result over the whole range
//! (test); inputs are clamped to `[-87.3, 88.7]`, so it never returns `inf`
//! or a denormal.

const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5·2²³: adding it rounds to an integer held in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    let t = x * LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = P[0];
    for c in &P[1..] {
        p = p * r + c;
    }
    let e = 1.0 + r + r * r * p;
    // n ∈ [-126, 128]: two steps keep each factor a normal number
    let k = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let half = k >> 1;
    let a = f32::from_bits(((half + 127) as u32) << 23);
    let b = f32::from_bits(((k - half + 127) as u32) << 23);
    e * a * b
}

/// `1 / (1 + e⁻ˣ)`.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `c · tanh(x / c)` and its derivative `1 − (y/c)²`, as
/// `c − 2c / (e^{2x/c} + 1)` (the form of [`crate::layers::soft_cap`]).
#[inline(always)]
pub(crate) fn soft_cap(x: f32, cap: f32) -> f32 {
    cap - 2.0 * cap / (exp(2.0 * x / cap) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> i64 {
        (i64::from(a.to_bits() as i32) - i64::from(b.to_bits() as i32)).abs()
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = (0, 0.0f32);
        let mut x = -87.3f32;
        while x <= 88.7 {
            let want = (f64::from(x)).exp() as f32;
            let got = exp(x);
            let u = ulps(got, want);
            if u > worst.0 {
                worst = (u, x);
            }
            x += 0.000_73;
        }
        assert!(worst.0 <= 2, "{} ulp at {}", worst.0, worst.1);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1e30), exp(-87.3));
        assert!(exp(1e30).is_finite() && exp(-1e30) > 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn sigmoid_and_soft_cap_by_hand() {
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
        // 1 / (1 + e^-2) = 0.880797…
        assert!((sigmoid(2.0) - 0.880_797_1).abs() < 1e-6);
        // 30 · tanh(15 / 30) = 30 · 0.4621172 = 13.86352
        assert!((soft_cap(15.0, 30.0) - 13.863_52).abs() < 1e-5);
        assert_eq!(soft_cap(1e6, 30.0), 30.0);
        assert_eq!(soft_cap(-1e6, 30.0), -30.0);
    }
}
