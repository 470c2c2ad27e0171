//! PDQ: the 256-bit perceptual image hash that industry hash-sharing programs exchange, so hash
//! lists from partners can be computed and compared here.
//!
//! Written from the published algorithm (Meta's "PDQ and TMK+PDQF" description, 2017) because the
//! one Rust crate for it is unmaintained and pinned to a five-year-old `image`: luminance, a tent
//! filter made of two passes of 1-D box filters along rows and columns (Jarosz) with windows of
//! 1/128 of each side, decimation to 64x64 at pixel centres, the 16x16 lowest non-constant
//! frequencies of a 2-D DCT, and one bit per frequency: above the median or not. The quality
//! score (0-100) counts significant gradients of the 64x64 image; hashes of flat images are noise.
//!
//! The arithmetic follows the reference order (f32 running sums, f32 DCT), so hashes agree with
//! the reference implementation bit for bit on most images and within a few bits on the rest
//! (`sidecar/tests/pdq.rs` checks against PyPI `pdqhash` on real photos).

use std::fmt;

/// Smallest side the algorithm accepts.
pub const MIN_SIDE: u32 = 5;
/// Hashes of lower quality are not reliable enough to match on (the reference's advice).
pub const MIN_MATCH_QUALITY: u8 = 50;
/// The Hamming distance at or below which two hashes are the same picture (the reference's).
pub const DEFAULT_MATCH_DISTANCE: u32 = 31;

const SIDE: usize = 64;
const FREQS: usize = 16;

/// A PDQ hash: bit `k` is bit `k % 16` of word `k / 16`, as in the reference's `Hash256`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pdq([u16; 16]);

/// Why a hex string is not a PDQ hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PdqError {
    /// Not 64 characters.
    #[error("a PDQ hash is 64 hex digits, got {0} characters")]
    Length(usize),
    /// A character that is not a hex digit.
    #[error("a PDQ hash is 64 hex digits, found {found:?} at position {at}")]
    NotHex {
        /// The offending character.
        found: char,
        /// Its position (0-based).
        at: usize,
    },
}

impl Pdq {
    /// The hash and quality (0-100) of a packed RGB8 image, `None` when a side is under
    /// [`MIN_SIDE`] pixels.
    pub fn of_rgb(width: u32, height: u32, rgb: &[u8]) -> Option<(Pdq, u8)> {
        let (cols, rows) = (width as usize, height as usize);
        if width < MIN_SIDE || height < MIN_SIDE || rgb.len() != cols * rows * 3 {
            return None;
        }
        let mut luma: Vec<f32> = rgb
            .chunks_exact(3)
            .map(|p| (f64::from(p[0]) * 0.299 + f64::from(p[1]) * 0.587 + f64::from(p[2]) * 0.114) as f32)
            .collect();
        let small = downsample(&mut luma, rows, cols);
        let quality = quality(&small);
        let freqs = dct_64_to_16(&small);
        Some((Pdq::from_frequencies(&freqs), quality))
    }

    /// One bit per frequency: set when it is above the median (the 128th smallest of 256).
    fn from_frequencies(freqs: &[f32; FREQS * FREQS]) -> Pdq {
        let mut sorted = *freqs;
        let (_, median, _) = sorted.select_nth_unstable_by(127, f32::total_cmp);
        let median = *median;
        let mut words = [0u16; 16];
        for (k, f) in freqs.iter().enumerate() {
            if *f > median {
                words[k / 16] |= 1 << (k % 16);
            }
        }
        Pdq(words)
    }

    /// Parses the reference's hex form (its `toHexString`): 64 hex digits, the most significant
    /// word first; either case.
    pub fn from_hex(hex: &str) -> Result<Pdq, PdqError> {
        let chars: Vec<char> = hex.chars().collect();
        if chars.len() != 64 {
            return Err(PdqError::Length(chars.len()));
        }
        let mut words = [0u16; 16];
        for (at, c) in chars.iter().enumerate() {
            let digit = c.to_digit(16).ok_or(PdqError::NotHex { found: *c, at })?;
            let word = 15 - at / 4;
            words[word] = (words[word] << 4) | digit as u16;
        }
        Ok(Pdq(words))
    }

    /// The number of bits in which two hashes differ (0..=256).
    pub fn distance(&self, other: &Pdq) -> u32 {
        self.0.iter().zip(other.0.iter()).map(|(a, b)| (a ^ b).count_ones()).sum()
    }
}

/// The reference's hex form: 64 lowercase hex digits, word 15 first.
impl fmt::Display for Pdq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().rev().try_for_each(|w| write!(f, "{w:04x}"))
    }
}

/// As its hex form, the way hash lists and profile files carry it.
impl serde::Serialize for Pdq {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Pdq {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let hex = String::deserialize(deserializer)?;
        Pdq::from_hex(&hex).map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for Pdq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pdq({self})")
    }
}

/// Blurs `luma` (rows x cols, row-major) with the tent filter and samples it at the centres of a
/// 64x64 grid. A 64x64 input is taken as it is.
fn downsample(luma: &mut [f32], rows: usize, cols: usize) -> Vec<f32> {
    if rows == SIDE && cols == SIDE {
        return luma.to_vec();
    }
    let window = |side: usize| side.div_ceil(2 * SIDE);
    let (along_rows, along_cols) = (window(cols), window(rows));
    let mut scratch = vec![0.0f32; luma.len()];
    for _ in 0..2 {
        for r in 0..rows {
            let span = r * cols..(r + 1) * cols;
            box_filter(&luma[span.clone()], &mut scratch[span], 1, cols, along_rows);
        }
        for c in 0..cols {
            box_filter(&scratch[c..], &mut luma[c..], cols, rows, along_cols);
        }
    }
    let mut out = Vec::with_capacity(SIDE * SIDE);
    for i in 0..SIDE {
        let r = ((i as f64 + 0.5) * rows as f64 / SIDE as f64) as usize;
        for j in 0..SIDE {
            let c = ((j as f64 + 0.5) * cols as f64 / SIDE as f64) as usize;
            out.push(luma[r * cols + c]);
        }
    }
    out
}

/// A 1-D box filter of `window` samples over `len` samples `stride` apart: each output is the
/// mean of the inputs from `window - half` before to `half - 1` after it (`half` = (window+2)/2),
/// clipped at the ends. A running sum, added and subtracted in the reference's order.
fn box_filter(input: &[f32], output: &mut [f32], stride: usize, len: usize, window: usize) {
    let half = (window + 2) / 2;
    let (before, after) = (window - half, half - 1);
    let mut sum = 0.0f32;
    for k in 0..after.min(len) {
        sum += input[k * stride];
    }
    for k in 0..len {
        if k + after < len {
            sum += input[(k + after) * stride];
        }
        if k > before {
            sum -= input[(k - before - 1) * stride];
        }
        let count = (k + after).min(len - 1) + 1 - k.saturating_sub(before);
        output[k * stride] = sum / count as f32;
    }
}

/// Significant gradients of the 64x64 image, scaled to 0-100 (the reference's heuristic).
fn quality(img: &[f32]) -> u8 {
    let step = |u: f32, v: f32| (((u - v) * 100.0) / 255.0) as i32;
    let mut sum: i64 = 0;
    for i in 0..SIDE - 1 {
        for j in 0..SIDE {
            sum += i64::from(step(img[i * SIDE + j], img[(i + 1) * SIDE + j]).abs());
        }
    }
    for i in 0..SIDE {
        for j in 0..SIDE - 1 {
            sum += i64::from(step(img[i * SIDE + j], img[i * SIDE + j + 1]).abs());
        }
    }
    (sum / 90).min(100) as u8
}

/// Frequencies 1..=16 along both axes of the 2-D DCT-II of the 64x64 image, as D A Dᵀ.
fn dct_64_to_16(a: &[f32]) -> [f32; FREQS * FREQS] {
    let d = dct_matrix();
    let mut t = [0.0f32; FREQS * SIDE];
    for i in 0..FREQS {
        for j in 0..SIDE {
            t[i * SIDE + j] = (0..SIDE).fold(0.0f32, |s, k| s + d[i * SIDE + k] * a[k * SIDE + j]);
        }
    }
    let mut b = [0.0f32; FREQS * FREQS];
    for i in 0..FREQS {
        for j in 0..FREQS {
            b[i * FREQS + j] = (0..SIDE).fold(0.0f32, |s, k| s + t[i * SIDE + k] * d[j * SIDE + k]);
        }
    }
    b
}

/// Rows 1..=16 of the 64-point DCT-II matrix, scaled by sqrt(2/64).
fn dct_matrix() -> &'static [f32; FREQS * SIDE] {
    static MATRIX: std::sync::OnceLock<[f32; FREQS * SIDE]> = std::sync::OnceLock::new();
    MATRIX.get_or_init(|| {
        let scale = f64::from((2.0f64 / SIDE as f64).sqrt() as f32);
        let mut m = [0.0f32; FREQS * SIDE];
        for i in 0..FREQS {
            for j in 0..SIDE {
                let angle = std::f64::consts::PI / 2.0 / SIDE as f64 * (i + 1) as f64 * (2 * j + 1) as f64;
                m[i * SIDE + j] = (scale * angle.cos()) as f32;
            }
        }
        m
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth test picture with structure at several scales.
    fn picture(width: u32, height: u32, phase: f32) -> Vec<u8> {
        let mut rgb = Vec::with_capacity((width * height * 3) as usize);
        for y in 0..height {
            for x in 0..width {
                let (fx, fy) = (x as f32 / width as f32, y as f32 / height as f32);
                let v = 128.0 + 60.0 * (fx * 9.0 + phase).sin() * (fy * 5.0).cos() + 40.0 * ((fx - fy) * 23.0).sin();
                let v = v.clamp(0.0, 255.0) as u8;
                rgb.extend_from_slice(&[v, v.saturating_sub(20), 255 - v]);
            }
        }
        rgb
    }

    #[test]
    fn hex_round_trips_and_bad_hex_is_named() {
        let hash = Pdq::of_rgb(200, 150, &picture(200, 150, 0.0)).unwrap().0;
        let hex = hash.to_string();
        assert_eq!(hex.len(), 64);
        assert_eq!(Pdq::from_hex(&hex), Ok(hash));
        assert_eq!(Pdq::from_hex(&hex.to_uppercase()), Ok(hash));
        assert_eq!(Pdq::from_hex(&hex[..63]), Err(PdqError::Length(63)));
        let mut bad = hex.clone();
        bad.replace_range(10..11, "g");
        assert_eq!(Pdq::from_hex(&bad), Err(PdqError::NotHex { found: 'g', at: 10 }));
        assert_eq!(Pdq::from_hex(&"é".repeat(64)), Err(PdqError::NotHex { found: 'é', at: 0 }));

        let json = serde_json::to_string(&hash).unwrap();
        assert_eq!(json, format!("\"{hex}\""), "serialised as its hex form");
        assert_eq!(serde_json::from_str::<Pdq>(&json).unwrap(), hash);
        let err = serde_json::from_str::<Pdq>("\"abc\"").unwrap_err().to_string();
        assert!(err.contains("64 hex digits, got 3"), "{err}");
    }

    #[test]
    fn the_most_significant_word_comes_first() {
        let mut words = [0u16; 16];
        words[15] = 0xabcd;
        words[0] = 0x0001;
        let hex = Pdq(words).to_string();
        assert_eq!(&hex[..4], "abcd");
        assert_eq!(&hex[60..], "0001");
    }

    #[test]
    fn same_pixels_same_hash_and_half_the_bits_are_set() {
        let rgb = picture(320, 240, 0.0);
        let (a, quality) = Pdq::of_rgb(320, 240, &rgb).unwrap();
        let (b, _) = Pdq::of_rgb(320, 240, &rgb).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.distance(&b), 0);
        let ones: u32 = a.0.iter().map(|w| w.count_ones()).sum();
        assert_eq!(ones, 128, "one bit per frequency above the median");
        assert!(quality >= MIN_MATCH_QUALITY, "a structured picture is of good quality: {quality}");
    }

    #[test]
    fn resizing_moves_few_bits_and_another_picture_many() {
        let (a, _) = Pdq::of_rgb(640, 480, &picture(640, 480, 0.0)).unwrap();
        let (smaller, _) = Pdq::of_rgb(320, 240, &picture(320, 240, 0.0)).unwrap();
        let (other, _) = Pdq::of_rgb(640, 480, &picture(640, 480, 2.0)).unwrap();
        assert!(a.distance(&smaller) <= DEFAULT_MATCH_DISTANCE, "{}", a.distance(&smaller));
        assert!(a.distance(&other) > DEFAULT_MATCH_DISTANCE, "{}", a.distance(&other));
    }

    #[test]
    fn flat_and_tiny_images() {
        let grey = vec![128u8; 100 * 100 * 3];
        assert_eq!(Pdq::of_rgb(100, 100, &grey).unwrap().1, 0, "a flat image has quality 0");
        assert_eq!(Pdq::of_rgb(4, 100, &[0; 4 * 100 * 3]), None);
        assert_eq!(Pdq::of_rgb(10, 10, &[0; 5]), None, "a buffer of the wrong size");
        assert!(Pdq::of_rgb(5, 5, &[7; 75]).is_some());
    }

    #[test]
    fn the_box_filter_is_a_clipped_mean() {
        let input: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let mut out = vec![0.0; 16];
        box_filter(&input, &mut out, 1, 16, 7);
        // Window 7: three before, three after, clipped at the ends.
        assert_eq!(out[0], (0..=3).sum::<i32>() as f32 / 4.0);
        assert_eq!(out[5], (2..=8).sum::<i32>() as f32 / 7.0);
        assert_eq!(out[15], (12..=15).sum::<i32>() as f32 / 4.0);
        box_filter(&input, &mut out, 1, 16, 8);
        // Window 8: three before, four after.
        assert_eq!(out[0], (0..=4).sum::<i32>() as f32 / 5.0);
        assert_eq!(out[15], (12..=15).sum::<i32>() as f32 / 4.0);
    }
}
