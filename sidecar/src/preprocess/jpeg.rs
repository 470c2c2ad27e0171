//! JPEG at reduced resolution: decode straight to the smallest DCT scale that still covers the
//! model input.
//!
//! A model looks at 224x224 of a 12-megapixel phone photo. libjpeg-turbo can skip most of the
//! inverse DCT and colour conversion by decoding at 1/2, 1/4 or 1/8 of the size, which on a
//! 4032x3024 photo costs a fraction of a full decode (docs/benchmarks/pipeline.md); the resize
//! that follows then starts from 504x378 instead of 12 million pixels. The scale is chosen so the
//! decoded image is still at least as large as the input on both sides (after EXIF orientation),
//! so the resize only ever shrinks and the model sees the same picture (cosine >= 0.99 against a
//! full decode, checked on real photos in the tests).
//!
//! Only what libjpeg-turbo decodes to RGB takes this path: YCbCr, RGB and grey JPEGs, baseline
//! or progressive. CMYK and YCCK (print files) and lossless JPEGs, headers libjpeg-turbo cannot
//! read, and files it reports as damaged go to the general decoder, which keeps its own
//! behaviour for them: nothing that decoded before this path existed stops decoding.

use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat, ScalingFactor};

use super::PreprocessError;

/// Most progressive scans accepted: a crafted progressive JPEG can carry thousands of scans that
/// each cost a pass over the image (libjpeg-turbo's own tools suggest a limit of this order).
const MAX_SCANS: u32 = 500;

/// How JPEGs are decoded (`--jpeg-decode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JpegDecode {
    /// At the smallest DCT scale that still covers the model input.
    #[default]
    Reduced,
    /// Always at full size (the general decoder), as before reduced decoding existed.
    Full,
}

impl std::str::FromStr for JpegDecode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "reduced" => Ok(JpegDecode::Reduced),
            "full" => Ok(JpegDecode::Full),
            other => Err(format!("{other:?}: expected reduced or full")),
        }
    }
}

impl JpegDecode {
    /// Lower-case name for metrics and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            JpegDecode::Reduced => "reduced",
            JpegDecode::Full => "full",
        }
    }
}

/// The smallest DCT scale (1/8, 1/4, 1/2, else 1) at which a `width` x `height` image is still at
/// least `out_width` x `out_height`. The same rule serves `stretch` (both sides must cover the
/// input) and `center_crop` (the crop's shorter side must, which is the same inequality).
pub fn scale_for(width: u32, height: u32, out_width: u32, out_height: u32) -> ScalingFactor {
    [ScalingFactor::ONE_EIGHTH, ScalingFactor::ONE_QUARTER, ScalingFactor::ONE_HALF]
        .into_iter()
        .find(|s| s.scale(width as usize) >= out_width as usize && s.scale(height as usize) >= out_height as usize)
        .unwrap_or(ScalingFactor::ONE)
}

/// RGB8 pixels of a JPEG decoded at `scale`, or None when this decoder does not take the file
/// (see the module docs): the general decoder then decodes it, or reports what is wrong with it.
pub fn decode_scaled(bytes: &[u8], scale: ScalingFactor) -> Option<(u32, u32, Vec<u8>)> {
    decode_with_turbojpeg(bytes, scale)
        .inspect_err(|e| tracing::debug!(error = %e, "libjpeg-turbo declined the JPEG; using the general decoder"))
        .ok()
        .flatten()
}

fn decode_with_turbojpeg(bytes: &[u8], scale: ScalingFactor) -> turbojpeg::Result<Option<(u32, u32, Vec<u8>)>> {
    let mut decompressor = Decompressor::new()?;
    let header = decompressor.read_header(bytes)?;
    if matches!(header.colorspace, Colorspace::CMYK | Colorspace::YCCK) || header.is_lossless {
        return Ok(None);
    }
    let scaled = header.scaled(scale);
    let (Ok(width), Ok(height)) = (u32::try_from(scaled.width), u32::try_from(scaled.height)) else {
        return Ok(None);
    };
    decompressor.set_scaling_factor(scale)?;
    decompressor.set_scan_limit(MAX_SCANS)?;
    let mut pixels = vec![0u8; 3 * scaled.width * scaled.height];
    let image = Image {
        pixels: pixels.as_mut_slice(),
        width: scaled.width,
        pitch: 3 * scaled.width,
        height: scaled.height,
        format: PixelFormat::RGB,
    };
    // Damaged data is an error here (libjpeg calls it a warning, turbojpeg fails on it); the
    // general decoder is more lenient and stays the judge of what is corrupt.
    decompressor.decompress(bytes, image)?;
    Ok(Some((width, height, pixels)))
}

/// Refuses a JPEG that cannot hold the picture its header declares: one whose marker stream stops
/// before the end-of-image marker (0xFFD9), or whose image data is too short for the declared size.
///
/// JPEG decoders pad missing entropy-coded data and return an image whose lower part is grey,
/// without an error. A half-uploaded photo, or one whose frame header was rewritten to a larger
/// size, would then be embedded and matched as if it were whole, so both are detected here:
/// - Truncation: the segments are walked rather than the last two bytes checked, since phones
///   append data after the EOI (motion photos, maker trailers) and an EXIF thumbnail holds an EOI
///   of its own, so neither "ends with" nor "contains" FFD9 answers the question.
/// - Too little data: with Huffman coding every 8x8 block costs at least one code for its DC
///   difference and, in a sequential JPEG, one for its end-of-block, each at least one bit. So a
///   sequential JPEG holds at least 2 bits of image data per block, a progressive one at least 1.
///   Arithmetic-coded and lossless JPEGs have no such floor and are not checked.
pub fn check_complete(bytes: &[u8]) -> Result<(), PreprocessError> {
    let walk = walk(bytes);
    if !walk.ended {
        return Err(PreprocessError::Corrupt("JPEG is truncated (no end-of-image marker)".to_owned()));
    }
    if let Some(frame) = walk.frame
        && let Some(bits) = frame.min_bits_per_block
    {
        let needed = frame.blocks.saturating_mul(bits) / 8;
        if walk.data_bytes < needed {
            return Err(PreprocessError::Corrupt(format!(
                "JPEG holds {} bytes of image data, fewer than the {}x{} its header declares needs (at least \
                 {needed}): the header's size does not match the data",
                walk.data_bytes, frame.width, frame.height
            )));
        }
    }
    Ok(())
}

/// What a walk over a JPEG's segments found.
struct Walk {
    /// Whether the end-of-image marker came.
    ended: bool,
    /// The frame header (first SOF), if any.
    frame: Option<Frame>,
    /// Bytes of entropy-coded data (a stuffed `FF 00` counts as one).
    data_bytes: u64,
}

/// What a frame header declares.
struct Frame {
    width: u32,
    height: u32,
    /// 8x8 blocks over all components, before padding to whole MCUs.
    blocks: u64,
    /// The least image data per block the frame's coding allows; None when it has no floor.
    min_bits_per_block: Option<u64>,
}

fn walk(bytes: &[u8]) -> Walk {
    let mut walk = Walk { ended: false, frame: None, data_bytes: 0 };
    let mut i = 2; // past SOI
    while i + 1 < bytes.len() {
        if bytes[i] != 0xFF {
            // Entropy-coded data, or stray bytes between segments (which decoders skip too).
            walk.data_bytes += 1;
            i += 1;
            continue;
        }
        match bytes[i + 1] {
            0xD9 => {
                walk.ended = true;
                return walk;
            }
            0xFF => i += 1, // fill byte before a marker
            0x00 => {
                walk.data_bytes += 1; // a stuffed 0xFF in scan data
                i += 2;
            }
            0x01 | 0xD0..=0xD8 => i += 2, // markers without a length (TEM, RSTn, SOI)
            marker => {
                let len = bytes.get(i + 2..i + 4).map_or(0, |l| usize::from(u16::from_be_bytes([l[0], l[1]])));
                if walk.frame.is_none() && is_sof(marker) {
                    walk.frame = bytes.get(i + 4..i + 2 + len).and_then(|body| frame(marker, body));
                }
                i += 2 + len.max(2);
            }
        }
    }
    walk
}

/// SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
fn is_sof(marker: u8) -> bool {
    matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC)
}

/// Parses a frame header body: precision, height, width, then (id, sampling, table) per component.
fn frame(marker: u8, body: &[u8]) -> Option<Frame> {
    let height = u32::from(u16::from_be_bytes([*body.get(1)?, *body.get(2)?]));
    let width = u32::from(u16::from_be_bytes([*body.get(3)?, *body.get(4)?]));
    let count = usize::from(*body.get(5)?);
    let sampling: Vec<(u64, u64)> = (0..count)
        .map(|c| body.get(6 + 3 * c + 1).map(|s| (u64::from(s >> 4), u64::from(s & 0x0F))))
        .collect::<Option<_>>()?;
    let h_max = sampling.iter().map(|s| s.0).max()?.max(1);
    let v_max = sampling.iter().map(|s| s.1).max()?.max(1);
    let blocks = sampling
        .iter()
        .map(|&(h, v)| {
            let w = (u64::from(width) * h).div_ceil(h_max);
            let ht = (u64::from(height) * v).div_ceil(v_max);
            w.div_ceil(8) * ht.div_ceil(8)
        })
        .sum();
    let min_bits_per_block = match marker {
        0xC0 | 0xC1 => Some(2), // sequential, Huffman
        0xC2 => Some(1),        // progressive, Huffman
        _ => None,              // lossless, hierarchical or arithmetic-coded
    };
    Some(Frame { width, height, blocks, min_bits_per_block })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn factor(s: ScalingFactor) -> (usize, usize) {
        (s.num(), s.denom())
    }

    #[test]
    fn the_scale_is_the_smallest_that_covers_the_input() {
        let cases = [
            // (image, input, scale): a 12 MP photo fits 1/8 for 224x224 (504x378 >= 224).
            ((4032, 3024), (224, 224), (1, 8)),
            ((1920, 1080), (224, 224), (1, 4)), // 1/8 gives 240x135: too short
            ((640, 400), (224, 224), (1, 1)),   // 1/2 gives 320x200: too short
            ((448, 448), (224, 224), (1, 2)),   // exactly covered
            ((447, 448), (224, 224), (1, 2)),   // ceil(447/2) = 224 still covers
            ((445, 448), (224, 224), (1, 1)),
            ((100, 100), (224, 224), (1, 1)), // smaller than the input: full size, the resize enlarges
            ((3024, 4032), (300, 200), (1, 8)),
            ((4032, 600), (224, 224), (1, 2)), // the short side decides
        ];
        for ((w, h), (ow, oh), want) in cases {
            assert_eq!(factor(scale_for(w, h, ow, oh)), want, "{w}x{h} for {ow}x{oh}");
        }
    }

    #[test]
    fn the_mode_parses_from_its_flag_value() {
        assert_eq!("reduced".parse(), Ok(JpegDecode::Reduced));
        assert_eq!("FULL".parse(), Ok(JpegDecode::Full));
        assert!("half".parse::<JpegDecode>().unwrap_err().contains("expected reduced or full"));
    }
}
