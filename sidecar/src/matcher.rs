//! Cosine similarity over unit vectors.
//!
//! Embeddings are normalised once, when they enter the server (model output, profile references),
//! so every comparison afterwards is a plain dot product. A scan compares one query with every
//! reference of every profile, which makes [`cosine`] the inner loop of matching; it is written so
//! the compiler keeps several independent SIMD accumulators busy.

/// Number of independent partial sums; enough to hide floating-point add latency with AVX2.
const LANES: usize = 8;

/// Scales a vector to unit length in place; returns false (and leaves it) when its norm is 0 or not finite.
pub fn normalize(v: &mut [f32]) -> bool {
    // Summed in f64 so that large or many components neither overflow nor lose precision.
    let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return false;
    }
    let inv = 1.0 / norm;
    for x in v.iter_mut() {
        *x = (f64::from(*x) * inv) as f32;
    }
    true
}

/// Dot product of two equal-length unit vectors = their cosine.
///
/// Lengths are expected to match (profiles are validated against the model's dimension); if they do
/// not, the extra components of the longer vector are ignored.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let mut acc = [0.0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for ((sum, x), y) in acc.iter_mut().zip(x).zip(y) {
            *sum += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum()
    }

    /// Deterministic pseudo-random values in -1..1 (no RNG crate needed).
    fn pseudo_random(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn cosine_agrees_with_a_naive_dot_product() {
        for (len, seed) in [(1280, 1), (1280, 2), (512, 3), (1, 4), (7, 5), (13, 6), (0, 7)] {
            let mut a = pseudo_random(len, seed);
            let mut b = pseudo_random(len, seed + 100);
            if len > 0 {
                assert!(normalize(&mut a) && normalize(&mut b));
            }
            let got = cosine(&a, &b);
            let want = naive(&a, &b);
            assert!((f64::from(got) - want).abs() < 1e-5, "len {len}: {got} vs {want}");
        }
    }

    #[test]
    fn cosine_of_known_vectors() {
        let mut v = pseudo_random(1280, 9);
        assert!(normalize(&mut v));
        assert!((cosine(&v, &v) - 1.0).abs() < 1e-5);
        let neg: Vec<f32> = v.iter().map(|x| -x).collect();
        assert!((cosine(&v, &neg) + 1.0).abs() < 1e-5);
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 1.0]), 0.0);
    }

    #[test]
    fn normalize_makes_unit_vectors() {
        let mut v = vec![3.0, 4.0];
        assert!(normalize(&mut v));
        assert_eq!(v, [0.6, 0.8]);

        let mut big = vec![3e30f32, 4e30];
        assert!(normalize(&mut big), "no overflow in the norm");
        assert!((big[0] - 0.6).abs() < 1e-6);
    }

    #[test]
    fn normalize_refuses_and_keeps_degenerate_vectors() {
        for v in [vec![0.0, 0.0], vec![], vec![1.0, f32::NAN], vec![f32::INFINITY, 1.0]] {
            let mut copy = v.clone();
            assert!(!normalize(&mut copy), "{v:?}");
            assert_eq!(format!("{copy:?}"), format!("{v:?}"), "left unchanged");
        }
    }
}
