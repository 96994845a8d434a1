//! Minimal reproduction of the element-wise gap behind the training-step
//! ratio (README, Benchmark): Burn's CPU backend (`flex`, burn 0.22.1) runs
//! `exp` through scalar libm calls on one thread, and its binary kernels on
//! one thread, while a plain Rust loop split over two threads does the same
//! work in a fraction of the time. Prints one JSON line per operation.
//!
//!     cargo run --release -p posttrain-model --example flex_elementwise

use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};

const N: usize = 1 << 20;
const REPS: usize = 20;

fn best_of(mut f: impl FnMut()) -> f64 {
    (0..REPS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn two_threads(out: &mut [f32], f: impl Fn(&mut [f32], usize) + Sync) {
    let (a, b) = out.split_at_mut(out.len() / 2);
    let half = a.len();
    rayon::join(|| f(a, 0), || f(b, half));
}

fn main() {
    let device = Device::default();
    let xs: Vec<f32> = (0..N).map(|i| (i % 2000) as f32 / 1000.0 - 1.0).collect();
    let x = Tensor::<1>::from_data(TensorData::new(xs.clone(), [N]), &device);
    let y = x.clone().mul_scalar(0.5);
    let mut out = vec![0.0f32; N];

    let burn_exp = best_of(|| {
        x.clone().exp().into_data();
    });
    let loop_exp = best_of(|| {
        two_threads(&mut out, |o, at| {
            o.iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = xs[at + i].exp())
        })
    });
    let burn_mul = best_of(|| {
        (x.clone() * y.clone()).into_data();
    });
    let loop_mul = best_of(|| {
        two_threads(&mut out, |o, at| {
            o.iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = xs[at + i] * (xs[at + i] * 0.5))
        })
    });
    for (op, burn, ours) in [("exp", burn_exp, loop_exp), ("mul", burn_mul, loop_mul)] {
        println!(
            "{{\"op\":\"{op}\",\"elements\":{N},\"burn_flex_ms\":{:.3},\"two_thread_loop_ms\":{:.3},\"ratio\":{:.2}}}",
            burn * 1e3,
            ours * 1e3,
            burn / ours
        );
    }
}
