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

/// Refuses a JPEG whose marker stream stops before the end-of-image marker (0xFFD9).
///
/// JPEG decoders pad a truncated entropy-coded segment and return an image whose lower part is
/// grey, without an error. A half-uploaded photo would then be embedded and matched as if it were
/// whole, so truncation is detected here. The segments are walked rather than the last two bytes
/// checked: phones append data after the EOI (motion photos, maker trailers) and an EXIF thumbnail
/// holds an EOI of its own, so neither "ends with" nor "contains" FFD9 answers the question.
pub fn check_complete(bytes: &[u8]) -> Result<(), PreprocessError> {
    let mut i = 2; // past SOI
    while i + 1 < bytes.len() {
        if bytes[i] != 0xFF {
            // Entropy-coded data, or stray bytes between segments (which decoders skip too).
            i += 1;
            continue;
        }
        match bytes[i + 1] {
            0xD9 => return Ok(()),
            0xFF => i += 1,                      // fill byte before a marker
            0x00 | 0x01 | 0xD0..=0xD8 => i += 2, // stuffed 0xFF in scan data, or a marker without a length
            _ => {
                let len = bytes.get(i + 2..i + 4).map_or(0, |l| usize::from(u16::from_be_bytes([l[0], l[1]])));
                i += 2 + len.max(2);
            }
        }
    }
    Err(PreprocessError::Corrupt("JPEG is truncated (no end-of-image marker)".to_owned()))
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
