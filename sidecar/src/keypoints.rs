//! Keypoints: local features that verify a candidate copy by geometry, where the global embedding
//! alone cannot tell a re-upload from a look-alike photo.
//!
//! An ImageNet embedding scores two different photos of yellow flowers about as high as a photo
//! and its crop pasted into a screenshot, so no one threshold separates both (docs/models.md,
//! "Hard copies"). A copy, however edited, keeps many small corners in the same arrangement up to
//! a scale, a rotation and a shift; a look-alike does not. This module finds those corners and
//! counts how many agree with one similarity transform.
//!
//! The features are ORB-style (Rublee et al., "ORB: an efficient alternative to SIFT or SURF",
//! ICCV 2011), written here because no maintained Rust crate provides them and the OpenCV
//! bindings would add a C++ toolchain and library to every build: the image in grey at 512 pixels
//! on its long side, a pyramid of [`LEVELS`] levels, FAST-9 corners with non-maximum suppression,
//! the strongest [`MAX_POINTS`] kept in proportion to each level's area, an orientation from the
//! intensity centroid of a round patch, and a 256-bit steered BRIEF descriptor over a smoothed
//! patch (fixed point pairs from an isotropic Gaussian). [`verify`] matches descriptors (nearest
//! neighbour with a ratio test) and fits a similarity transform by RANSAC.

use std::sync::LazyLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

mod verify;

pub use verify::verify;

/// The long side, in pixels, that images are described at.
pub const LONG_SIDE: u32 = 512;
/// Most keypoints kept per image.
pub const MAX_POINTS: usize = 500;
/// Pyramid levels and the scale between two of them.
const LEVELS: usize = 6;
const LEVEL_SCALE: f32 = 1.25;
/// FAST: a corner has 9 contiguous circle pixels this much brighter or darker than the centre.
/// (A second, lower threshold for smooth photos found more corners there but raised false
/// matches more than it raised recall: docs/models.md.)
const FAST_THRESHOLD: i16 = 20;
/// Radius of the orientation patch.
const PATCH_RADIUS: i32 = 15;
/// Distance from the edge within which no keypoint is taken: the rotated pairs reach 13 * sqrt 2
/// from the centre, plus the smoothing window.
const BORDER: i32 = 21;
/// Bytes of one stored keypoint: x and y (f32) and the descriptor.
const RECORD: usize = 8 + 32;

/// One image's keypoints: positions in the frame of the image scaled to [`LONG_SIDE`], and their
/// 256-bit descriptors.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Keypoints {
    points: Vec<[f32; 2]>,
    descriptors: Vec<[u64; 4]>,
}

/// Why stored keypoints cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeypointsError {
    /// Not base64.
    #[error("keypoints are not base64: {0}")]
    Encoding(String),
    /// Not a whole number of records, or too many.
    #[error("keypoints are {0} bytes: not a whole number of {RECORD}-byte records up to {MAX_POINTS}")]
    Length(usize),
    /// A position that is not finite.
    #[error("keypoint {0} has a position that is not a finite number")]
    Position(usize),
}

impl Keypoints {
    /// The keypoints of a packed RGB8 image.
    pub fn of_rgb(width: u32, height: u32, rgb: &[u8]) -> Keypoints {
        let Some((w, h, grey)) = grey_at_long_side(width, height, rgb) else { return Keypoints::default() };
        let levels = pyramid(w, h, grey);
        let total_area: usize = levels.iter().map(|l| l.width * l.height).sum();
        let mut out = Keypoints::default();
        for (index, level) in levels.iter().enumerate() {
            let quota = MAX_POINTS * level.width * level.height / total_area.max(1);
            let mut corners = fast_corners(level, FAST_THRESHOLD);
            corners.sort_by(|a, b| b.2.cmp(&a.2).then(a.1.cmp(&b.1)).then(a.0.cmp(&b.0)));
            corners.truncate(quota);
            let smooth = level.box_blurred();
            let scale = LEVEL_SCALE.powi(index as i32);
            for (x, y, _) in corners {
                let angle = orientation(&smooth, x, y);
                out.descriptors.push(describe(&smooth, x, y, angle));
                out.points.push([x as f32 * scale, y as f32 * scale]);
            }
        }
        out
    }

    /// How many keypoints there are.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether there are none (a flat or tiny image).
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The stored form: base64 of each keypoint's x, y (little-endian f32) and descriptor
    /// (four little-endian u64).
    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(self.len() * RECORD);
        for (point, descriptor) in self.points.iter().zip(&self.descriptors) {
            bytes.extend_from_slice(&point[0].to_le_bytes());
            bytes.extend_from_slice(&point[1].to_le_bytes());
            for word in descriptor {
                bytes.extend_from_slice(&word.to_le_bytes());
            }
        }
        BASE64.encode(bytes)
    }

    /// Reads the stored form back.
    pub fn decode(text: &str) -> Result<Keypoints, KeypointsError> {
        let bytes = BASE64.decode(text).map_err(|e| KeypointsError::Encoding(e.to_string()))?;
        if !bytes.len().is_multiple_of(RECORD) || bytes.len() / RECORD > MAX_POINTS {
            return Err(KeypointsError::Length(bytes.len()));
        }
        let mut out = Keypoints::default();
        for (i, record) in bytes.chunks_exact(RECORD).enumerate() {
            let mut fields = record.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]);
            let mut next = || fields.next().unwrap_or_default();
            let (x, y) = (f32::from_le_bytes(next()), f32::from_le_bytes(next()));
            if !x.is_finite() || !y.is_finite() {
                return Err(KeypointsError::Position(i));
            }
            let mut word = || {
                let (low, high) = (next(), next());
                u64::from_le_bytes([low[0], low[1], low[2], low[3], high[0], high[1], high[2], high[3]])
            };
            let descriptor = [word(), word(), word(), word()];
            out.points.push([x, y]);
            out.descriptors.push(descriptor);
        }
        Ok(out)
    }
}

impl serde::Serialize for Keypoints {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.encode())
    }
}

impl<'de> serde::Deserialize<'de> for Keypoints {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Keypoints::decode(&text).map_err(serde::de::Error::custom)
    }
}

/// A grey image, one byte a pixel, row after row.
struct Grey {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Grey {
    fn at(&self, x: i32, y: i32) -> u8 {
        self.pixels[y as usize * self.width + x as usize]
    }

    /// A 5x5 box blur (two passes of running sums), edges clamped: BRIEF compares smoothed
    /// pixels so that noise and JPEG artefacts flip few bits.
    fn box_blurred(&self) -> Grey {
        let (w, h) = (self.width, self.height);
        let pass = |src: &[u8], len: usize, stride: usize, lines: usize, step: usize| {
            let mut out = vec![0u8; src.len()];
            for line in 0..lines {
                let base = line * step;
                let px = |i: isize| u32::from(src[base + i.clamp(0, len as isize - 1) as usize * stride]);
                let mut sum: u32 = (-2..=2).map(px).sum();
                for i in 0..len as isize {
                    out[base + i as usize * stride] = ((sum + 2) / 5) as u8;
                    sum = sum + px(i + 3) - px(i - 2);
                }
            }
            out
        };
        let rows = pass(&self.pixels, w, 1, h, w);
        Grey { width: w, height: h, pixels: pass(&rows, h, w, w, 1) }
    }
}

/// Luminance at [`LONG_SIDE`] on the long side (smaller images keep their size); None for an
/// image too small to hold a keypoint.
fn grey_at_long_side(width: u32, height: u32, rgb: &[u8]) -> Option<(u32, u32, Vec<u8>)> {
    if rgb.len() != width as usize * height as usize * 3 || width.min(height) < 2 * BORDER as u32 + 1 {
        return None;
    }
    let grey: Vec<u8> = rgb
        .chunks_exact(3)
        .map(|p| ((u32::from(p[0]) * 77 + u32::from(p[1]) * 150 + u32::from(p[2]) * 29 + 128) >> 8) as u8)
        .collect();
    let long = width.max(height);
    if long <= LONG_SIDE {
        return Some((width, height, grey));
    }
    let (w, h) = ((width * LONG_SIDE).div_ceil(long).max(1), (height * LONG_SIDE).div_ceil(long).max(1));
    resize(width, height, &grey, w, h).map(|pixels| (w, h, pixels))
}

fn resize(width: u32, height: u32, grey: &[u8], w: u32, h: u32) -> Option<Vec<u8>> {
    let src = ImageRef::new(width, height, grey, PixelType::U8).ok()?;
    let mut dst = Image::new(w, h, PixelType::U8);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new().resize(&src, &mut dst, &options).ok()?;
    Some(dst.into_vec())
}

/// The image and its smaller copies, each [`LEVEL_SCALE`] times smaller, while a keypoint fits.
fn pyramid(width: u32, height: u32, grey: Vec<u8>) -> Vec<Grey> {
    let mut levels = vec![Grey { width: width as usize, height: height as usize, pixels: grey }];
    for index in 1..LEVELS {
        let scale = LEVEL_SCALE.powi(index as i32);
        let (w, h) = ((width as f32 / scale).round() as u32, (height as f32 / scale).round() as u32);
        if w.min(h) < 2 * BORDER as u32 + 1 {
            break;
        }
        let Some(pixels) = resize(width, height, &levels[0].pixels, w, h) else { break };
        levels.push(Grey { width: w as usize, height: h as usize, pixels });
    }
    levels
}

/// The 16 pixels of the radius-3 Bresenham circle, clockwise from the top.
const CIRCLE: [(i32, i32); 16] = [
    (0, -3),
    (1, -3),
    (2, -2),
    (3, -1),
    (3, 0),
    (3, 1),
    (2, 2),
    (1, 3),
    (0, 3),
    (-1, 3),
    (-2, 2),
    (-3, 1),
    (-3, 0),
    (-3, -1),
    (-2, -2),
    (-1, -3),
];

/// Whether the 16-bit circle mask has 9 contiguous set bits (wrapping around).
fn has_arc(mask: u32) -> bool {
    let doubled = mask | (mask << 16);
    let mut run = doubled;
    for shift in 1..9 {
        run &= doubled >> shift;
    }
    run != 0
}

/// FAST-9 corners away from the border, after 3x3 non-maximum suppression of their scores (the
/// summed contrast of the circle pixels beyond the threshold): (x, y, score).
fn fast_corners(level: &Grey, threshold: i16) -> Vec<(i32, i32, u32)> {
    let (w, h) = (level.width as i32, level.height as i32);
    let mut scores = vec![0u32; level.pixels.len()];
    for y in BORDER..h - BORDER {
        for x in BORDER..w - BORDER {
            let centre = i16::from(level.at(x, y));
            let (bright, dark) = (centre + threshold, centre - threshold);
            // A 9-pixel arc covers two neighbouring compass pixels (of 0, 4, 8, 12): without such
            // a pair on one side there is no corner, which rules out most pixels after 4 loads.
            let (mut above, mut below) = (0u8, 0u8);
            for (k, (dx, dy)) in [(0, -3), (3, 0), (0, 3), (-3, 0)].into_iter().enumerate() {
                let v = i16::from(level.at(x + dx, y + dy));
                above |= u8::from(v > bright) << k;
                below |= u8::from(v < dark) << k;
            }
            let pair = |m: u8| m & (m >> 1 | m << 3) & 0b1111 != 0;
            if !pair(above) && !pair(below) {
                continue;
            }
            let (mut up, mut down, mut up_score, mut down_score) = (0u32, 0u32, 0u32, 0u32);
            for (k, (dx, dy)) in CIRCLE.iter().enumerate() {
                let v = i16::from(level.at(x + dx, y + dy));
                if v > bright {
                    up |= 1 << k;
                    up_score += (v - bright) as u32;
                } else if v < dark {
                    down |= 1 << k;
                    down_score += (dark - v) as u32;
                }
            }
            let score = match (has_arc(up), has_arc(down)) {
                (true, true) => up_score.max(down_score),
                (true, false) => up_score,
                (false, true) => down_score,
                (false, false) => 0,
            };
            scores[(y * w + x) as usize] = score;
        }
    }
    let mut corners = Vec::new();
    for y in BORDER..h - BORDER {
        for x in BORDER..w - BORDER {
            let score = scores[(y * w + x) as usize];
            if score == 0 {
                continue;
            }
            // Ties go to the first in scan order, so a flat plateau yields one corner.
            let beaten = (-1..=1).flat_map(|dy| (-1..=1).map(move |dx| (dx, dy))).any(|(dx, dy)| {
                let other = scores[((y + dy) * w + x + dx) as usize];
                (dy, dx) != (0, 0) && (other > score || (other == score && (dy, dx) < (0, 0)))
            });
            if !beaten {
                corners.push((x, y, score));
            }
        }
    }
    corners
}

/// The direction from the keypoint to its patch's intensity centroid, in radians.
fn orientation(level: &Grey, x: i32, y: i32) -> f32 {
    let (mut m10, mut m01) = (0i64, 0i64);
    for dy in -PATCH_RADIUS..=PATCH_RADIUS {
        let half = ((PATCH_RADIUS * PATCH_RADIUS - dy * dy) as f32).sqrt() as i32;
        for dx in -half..=half {
            let v = i64::from(level.at(x + dx, y + dy));
            m10 += i64::from(dx) * v;
            m01 += i64::from(dy) * v;
        }
    }
    (m01 as f32).atan2(m10 as f32)
}

/// The 256 point pairs BRIEF compares: an isotropic Gaussian of sigma 31/5 around the keypoint,
/// clipped to 13 pixels, from a fixed seed (SplitMix64 and Box-Muller), so every build describes
/// an image the same way.
static PAIRS: LazyLock<[[f32; 4]; 256]> = LazyLock::new(|| {
    let mut state: u64 = 0x1f_2015_0ab3;
    let mut uniform = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut gaussian = move || {
        let (u, v) = (uniform().max(f64::MIN_POSITIVE), uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos() * 31.0 / 5.0).clamp(-13.0, 13.0) as f32
    };
    std::array::from_fn(|_| [gaussian(), gaussian(), gaussian(), gaussian()])
});

/// The steered BRIEF descriptor: bit k is whether the first point of pair k, turned by `angle`
/// about the keypoint, is darker than the second.
fn describe(smooth: &Grey, x: i32, y: i32, angle: f32) -> [u64; 4] {
    let (sin, cos) = angle.sin_cos();
    let at = |px: f32, py: f32| {
        let (rx, ry) = ((px * cos - py * sin).round() as i32, (px * sin + py * cos).round() as i32);
        smooth.at(x + rx, y + ry)
    };
    let mut bits = [0u64; 4];
    for (k, [ax, ay, bx, by]) in PAIRS.iter().enumerate() {
        if at(*ax, *ay) < at(*bx, *by) {
            bits[k / 64] |= 1 << (k % 64);
        }
    }
    bits
}

#[cfg(test)]
mod tests;
