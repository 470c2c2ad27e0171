//! Geometric verification: how many keypoints of a query agree with one similarity transform
//! (scale, rotation, shift) onto a reference's.
//!
//! Descriptors are matched to their nearest reference descriptor by Hamming distance and kept
//! when clearly nearer than the second nearest (Lowe's ratio test). RANSAC then draws two matches
//! at a time, the least that fix a similarity, and counts the matches that land within
//! [`TOLERANCE`] pixels of where that transform puts them. The sampling is seeded, so the same
//! pair of images always gives the same count.

use super::Keypoints;

/// A match is kept when its distance is under this share of the second nearest's.
const RATIO: f32 = 0.8;
/// Pixels (in the [`super::LONG_SIDE`] frame) within which a transformed point is an inlier.
const TOLERANCE: f32 = 8.0;
/// Transforms tried.
const ROUNDS: usize = 300;
/// Scales outside this range are not a copy's (a query pasted at under a fifth, say).
const SCALES: std::ops::RangeInclusive<f32> = 0.2..=5.0;

/// Matches of `query` to `reference` consistent with one similarity transform (0 when fewer than
/// three descriptors match at all).
pub fn verify(query: &Keypoints, reference: &Keypoints) -> u32 {
    let matches = nearest(query, reference);
    if matches.len() < 3 {
        return 0;
    }
    let mut seed: u32 = 0x9e37_79b9;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed as usize % n
    };
    let mut best = 0;
    for _ in 0..ROUNDS.min(matches.len() * (matches.len() - 1)) {
        let (i, j) = (next(matches.len()), next(matches.len()));
        let Some(transform) = Similarity::through(matches[i], matches[j]) else { continue };
        let inliers = matches.iter().filter(|&&(q, r)| transform.error(q, r) < TOLERANCE).count() as u32;
        best = best.max(inliers);
    }
    best
}

/// A query point and the reference point its descriptor matched.
type Pair = ([f32; 2], [f32; 2]);

/// Ratio-test matches from query to reference. Compiled also for CPUs with POPCNT (and AVX2),
/// picked at run time: the baseline x86-64 target has no popcount instruction, and this loop is
/// most of a verification.
#[multiversion::multiversion(targets("x86_64+avx2+popcnt", "x86_64+popcnt"))]
fn nearest(query: &Keypoints, reference: &Keypoints) -> Vec<Pair> {
    let distance = |a: &[u64; 4], b: &[u64; 4]| -> u32 { a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum() };
    let mut out = Vec::new();
    for (point, descriptor) in query.points.iter().zip(&query.descriptors) {
        let (mut first, mut second, mut at) = (u32::MAX, u32::MAX, 0);
        for (k, other) in reference.descriptors.iter().enumerate() {
            let d = distance(descriptor, other);
            if d < first {
                (second, first, at) = (first, d, k);
            } else if d < second {
                second = d;
            }
        }
        if second != u32::MAX && (first as f32) < RATIO * second as f32 {
            out.push((*point, reference.points[at]));
        }
    }
    out
}

/// `r = a * q + t` with a and t complex numbers: a scale and rotation, then a shift.
struct Similarity {
    a: (f32, f32),
    t: (f32, f32),
}

impl Similarity {
    /// The transform taking both query points onto their reference points, if they are apart
    /// and the scale is a copy's.
    fn through((q1, r1): Pair, (q2, r2): Pair) -> Option<Similarity> {
        let (dq, dr) = ((q2[0] - q1[0], q2[1] - q1[1]), (r2[0] - r1[0], r2[1] - r1[1]));
        let norm = dq.0 * dq.0 + dq.1 * dq.1;
        if norm < 4.0 {
            return None;
        }
        // a = dr / dq (complex division).
        let a = ((dr.0 * dq.0 + dr.1 * dq.1) / norm, (dr.1 * dq.0 - dr.0 * dq.1) / norm);
        if !SCALES.contains(&(a.0 * a.0 + a.1 * a.1).sqrt()) {
            return None;
        }
        let t = (r1[0] - (a.0 * q1[0] - a.1 * q1[1]), r1[1] - (a.0 * q1[1] + a.1 * q1[0]));
        Some(Similarity { a, t })
    }

    /// How far the transformed query point lands from the reference point.
    fn error(&self, q: [f32; 2], r: [f32; 2]) -> f32 {
        let x = self.a.0 * q[0] - self.a.1 * q[1] + self.t.0;
        let y = self.a.0 * q[1] + self.a.1 * q[0] + self.t.1;
        ((x - r[0]).powi(2) + (y - r[1]).powi(2)).sqrt()
    }
}
