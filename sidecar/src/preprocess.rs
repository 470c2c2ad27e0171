//! Image bytes -> model input tensor.
//!
//! Everything a model needs to see an image the way it was trained comes from its card's
//! [`InputSpec`]: size, resize mode, channel order, layout and normalisation. The work is CPU-bound
//! (decode, SIMD resize, one pass of normalisation), so callers run [`Preprocessor::prepare`] on
//! tokio's blocking pool.
//!
//! Untrusted input is refused as early and as cheaply as possible: the format comes from the magic
//! bytes, and the pixel count from the header before anything is decoded, so a tiny file that claims
//! to be 50000x50000 costs a header parse, not gigabytes. `image::Limits` on the decoder are a second
//! guard should a header lie about what follows.

use std::io::Cursor;

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{ImageDecoder, ImageFormat, ImageReader, Limits};

use crate::model::{ColorOrder, InputSpec, Layout, ResizeMode};

/// Why an image could not be turned into a tensor.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// The request carried no bytes.
    #[error("image is empty")]
    Empty,
    /// The bytes are not JPEG, PNG, WebP, GIF or BMP.
    #[error("unknown image format (expected JPEG, PNG, WebP, GIF or BMP)")]
    UnknownFormat,
    /// The header declares more pixels than the server accepts.
    #[error("image is {width}x{height}, more than the {max_pixels} pixels allowed")]
    TooLarge {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// The configured limit.
        max_pixels: u64,
    },
    /// The image data is truncated or malformed.
    #[error("corrupt image: {0}")]
    Corrupt(String),
}

/// Turns encoded images into normalised tensors for one model input.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    input: InputSpec,
    max_pixels: u64,
    /// Per tensor channel: which RGB channel it reads, and `x * scale + offset` = `(x - mean) / std`.
    channels: [(usize, f32, f32); 3],
}

impl Preprocessor {
    /// A preprocessor for a card's input that refuses images with more than `max_pixels` pixels.
    ///
    /// `mean` and `std` are indexed in the tensor's channel order, so a BGR card lists them as
    /// blue, green, red (as OpenCV-trained models publish them).
    pub fn new(input: InputSpec, max_pixels: u64) -> Self {
        let channels = std::array::from_fn(|c| {
            let src = match input.color {
                ColorOrder::Rgb => c,
                ColorOrder::Bgr => 2 - c,
            };
            let scale = 1.0 / input.std[c];
            (src, scale, -input.mean[c] * scale)
        });
        Self { input, max_pixels, channels }
    }

    /// Number of f32 values one image produces (3 * width * height).
    pub fn tensor_len(&self) -> usize {
        3 * self.input.width as usize * self.input.height as usize
    }

    /// Decodes, resizes and normalises one image into `tensor_len()` f32s in the card's layout.
    pub fn prepare(&self, bytes: &[u8]) -> Result<Vec<f32>, PreprocessError> {
        let pixels = self.prepare_pixels(bytes)?;
        let mut out = vec![0.0f32; self.tensor_len()];
        self.normalize_into(&pixels, &mut out);
        Ok(out)
    }

    /// Decodes and resizes one image to the card's size: packed RGB8, a quarter of the tensor's
    /// bytes. Requests wait in the batch queue in this form and are normalised as their batch is
    /// assembled ([`Preprocessor::normalize_into`]).
    pub fn prepare_pixels(&self, bytes: &[u8]) -> Result<Vec<u8>, PreprocessError> {
        let (width, height, rgb) = self.decode(bytes)?;
        Ok(self.resize(width, height, rgb)?.into_vec())
    }

    /// Decodes to packed RGB8, checking the header's size before the pixels are read.
    fn decode(&self, bytes: &[u8]) -> Result<(u32, u32, Vec<u8>), PreprocessError> {
        if bytes.is_empty() {
            return Err(PreprocessError::Empty);
        }
        let format = reader(bytes)?.format();
        let (width, height) = match png_ihdr_size(bytes) {
            Some(size) => size,
            None => reader(bytes)?.into_dimensions().map_err(corrupt)?,
        };
        if u64::from(width) * u64::from(height) > self.max_pixels {
            return Err(PreprocessError::TooLarge { width, height, max_pixels: self.max_pixels });
        }
        if format == Some(ImageFormat::Jpeg) {
            check_jpeg_complete(bytes)?;
        }
        let side = u32::try_from(self.max_pixels).unwrap_or(u32::MAX);
        let mut limits = Limits::default();
        limits.max_image_width = Some(side);
        limits.max_image_height = Some(side);
        // 8 bytes a pixel covers the widest output a decoder produces here (16-bit RGBA PNG), plus
        // room for the decoders' own buffers.
        limits.max_alloc = Some(self.max_pixels.saturating_mul(8).saturating_add(64 << 20));
        let mut decoder = reader(bytes)?.into_decoder().map_err(corrupt)?;
        decoder.set_limits(limits).map_err(corrupt)?;
        // Phones store photos sideways and say so in EXIF; a user expects the upright picture.
        let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
        let mut image = image::DynamicImage::from_decoder(decoder).map_err(corrupt)?;
        if image.width() != width || image.height() != height {
            return Err(PreprocessError::Corrupt("decoded size differs from the header".to_owned()));
        }
        image.apply_orientation(orientation);
        Ok((image.width(), image.height(), image.into_rgb8().into_raw()))
    }

    /// Resizes packed RGB8 to the card's size with a bilinear convolution.
    fn resize(&self, width: u32, height: u32, rgb: Vec<u8>) -> Result<Image<'static>, PreprocessError> {
        let resize_err = |e: &dyn std::fmt::Display| PreprocessError::Corrupt(format!("cannot resize: {e}"));
        let src = Image::from_vec_u8(width, height, rgb, PixelType::U8x3).map_err(|e| resize_err(&e))?;
        let mut dst = Image::new(self.input.width, self.input.height, PixelType::U8x3);
        let mut options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
        if self.input.resize == ResizeMode::CenterCrop {
            options = options.fit_into_destination(Some((0.5, 0.5)));
        }
        Resizer::new().resize(&src, &mut dst, &options).map_err(|e| resize_err(&e))?;
        Ok(dst)
    }

    /// Writes `(x - mean) / std` per channel in the card's channel order and layout.
    /// Writes the normalised tensor of pixels from [`Preprocessor::prepare_pixels`] into `out`
    /// (`tensor_len()` values, in the card's layout and channel order).
    pub fn normalize_into(&self, pixels: &[u8], out: &mut [f32]) {
        match self.input.layout {
            Layout::Nchw => {
                let plane_len = out.len() / 3;
                for (plane, &(src, scale, offset)) in out.chunks_exact_mut(plane_len).zip(&self.channels) {
                    for (o, px) in plane.iter_mut().zip(pixels.chunks_exact(3)) {
                        *o = f32::from(px[src]) * scale + offset;
                    }
                }
            }
            Layout::Nhwc => {
                let [(s0, k0, b0), (s1, k1, b1), (s2, k2, b2)] = self.channels;
                for (o, px) in out.chunks_exact_mut(3).zip(pixels.chunks_exact(3)) {
                    o[0] = f32::from(px[s0]) * k0 + b0;
                    o[1] = f32::from(px[s1]) * k1 + b1;
                    o[2] = f32::from(px[s2]) * k2 + b2;
                }
            }
        }
    }
}

/// A reader over `bytes` whose format is known from its magic bytes and is one we accept.
fn reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, PreprocessError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Corrupt(e.to_string()))?;
    match reader.format() {
        Some(ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP | ImageFormat::Gif | ImageFormat::Bmp) => {
            Ok(reader)
        }
        _ => Err(PreprocessError::UnknownFormat),
    }
}

/// Width and height from a PNG's IHDR chunk, which the format requires to come first.
///
/// The PNG decoder reads every chunk up to the first image data before it reports a size, so a
/// header-only file would read as corrupt rather than too large; IHDR's fixed place makes the size
/// available from the first 24 bytes. The decoder still checks the chunk (and its CRC) later.
fn png_ihdr_size(bytes: &[u8]) -> Option<(u32, u32)> {
    if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") || bytes.get(12..16)? != b"IHDR" {
        return None;
    }
    let be = |at: usize| bytes.get(at..at + 4).and_then(|b| <[u8; 4]>::try_from(b).ok()).map(u32::from_be_bytes);
    Some((be(16)?, be(20)?))
}

/// Refuses a JPEG whose marker stream stops before the end-of-image marker (0xFFD9).
///
/// The JPEG decoder pads a truncated entropy-coded segment and returns an image whose lower part is
/// grey, without an error. A half-uploaded photo would then be embedded and matched as if it were
/// whole, so truncation is detected here. The segments are walked rather than the last two bytes
/// checked: phones append data after the EOI (motion photos, maker trailers) and an EXIF thumbnail
/// holds an EOI of its own, so neither "ends with" nor "contains" FFD9 answers the question.
fn check_jpeg_complete(bytes: &[u8]) -> Result<(), PreprocessError> {
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

fn corrupt(e: image::ImageError) -> PreprocessError {
    PreprocessError::Corrupt(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    fn spec(width: u32, height: u32, layout: Layout, color: ColorOrder, resize: ResizeMode) -> InputSpec {
        InputSpec { name: "input".to_owned(), layout, width, height, color, resize, mean: [0.0; 3], std: [1.0; 3] }
    }

    fn identity(width: u32, height: u32) -> Preprocessor {
        Preprocessor::new(spec(width, height, Layout::Nchw, ColorOrder::Rgb, ResizeMode::Stretch), 1 << 24)
    }

    fn encode(image: &RgbImage, format: ImageFormat) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        match format {
            // GIF and some encoders want RGBA.
            ImageFormat::Gif => image::DynamicImage::ImageRgb8(image.clone()).into_rgba8().write_to(&mut buf, format),
            _ => image.write_to(&mut buf, format),
        }
        .unwrap();
        buf.into_inner()
    }

    fn solid(width: u32, height: u32, rgb: [u8; 3]) -> RgbImage {
        RgbImage::from_pixel(width, height, Rgb(rgb))
    }

    fn gradient(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| Rgb([(x * 7 % 256) as u8, (y * 5 % 256) as u8, ((x ^ y) % 256) as u8]))
    }

    /// A PNG signature and IHDR chunk (with a correct CRC) claiming `width` x `height`, and nothing more.
    fn png_header(width: u32, height: u32) -> Vec<u8> {
        let mut chunk = b"IHDR".to_vec();
        chunk.extend_from_slice(&width.to_be_bytes());
        chunk.extend_from_slice(&height.to_be_bytes());
        chunk.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
        let crc = chunk.iter().fold(!0u32, |mut crc, &b| {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
            crc
        });
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(&chunk);
        png.extend_from_slice(&(!crc).to_be_bytes());
        png
    }

    #[test]
    fn every_supported_format_decodes() {
        let colour = [200u8, 100, 40];
        let formats = [
            (ImageFormat::Png, 0.0),
            (ImageFormat::Bmp, 0.0),
            (ImageFormat::Gif, 0.0),
            (ImageFormat::WebP, 0.0), // the image crate encodes WebP lossless
            (ImageFormat::Jpeg, 4.0),
        ];
        let pre = identity(2, 2);
        for (format, tolerance) in formats {
            let tensor = pre.prepare(&encode(&solid(8, 6, colour), format)).unwrap();
            assert_eq!(tensor.len(), pre.tensor_len(), "{format:?}");
            for (i, v) in tensor.iter().enumerate() {
                let want = f32::from(colour[i / 4]);
                assert!((v - want).abs() <= tolerance, "{format:?}: index {i} is {v}, want {want}");
            }
        }
    }

    #[test]
    fn layout_and_colour_order_place_each_value() {
        // Solid (10, 20, 30) with mean (1, 2, 3) and std (1, 2, 4): channel values are known exactly.
        let png = encode(&solid(4, 4, [10, 20, 30]), ImageFormat::Png);
        let rgb = [9.0, 9.0, 6.75];
        let bgr = [29.0, 9.0, 1.75];
        let cases = [
            (Layout::Nchw, ColorOrder::Rgb, rgb, true),
            (Layout::Nhwc, ColorOrder::Rgb, rgb, false),
            (Layout::Nchw, ColorOrder::Bgr, bgr, true),
            (Layout::Nhwc, ColorOrder::Bgr, bgr, false),
        ];
        for (layout, color, want, planar) in cases {
            let mut input = spec(2, 2, layout, color, ResizeMode::Stretch);
            input.mean = [1.0, 2.0, 3.0];
            input.std = [1.0, 2.0, 4.0];
            let tensor = Preprocessor::new(input, 1 << 20).prepare(&png).unwrap();
            for (i, v) in tensor.iter().enumerate() {
                let channel = if planar { i / 4 } else { i % 3 };
                assert_eq!(*v, want[channel], "{layout:?} {color:?} index {i}");
            }
        }
    }

    #[test]
    fn grey_and_alpha_become_rgb() {
        let grey = image::GrayImage::from_pixel(3, 3, image::Luma([50]));
        let mut buf = Cursor::new(Vec::new());
        grey.write_to(&mut buf, ImageFormat::Png).unwrap();
        assert_eq!(identity(1, 1).prepare(buf.get_ref()).unwrap(), vec![50.0; 3]);

        let rgba = image::RgbaImage::from_pixel(3, 3, image::Rgba([1, 2, 3, 0]));
        let mut buf = Cursor::new(Vec::new());
        rgba.write_to(&mut buf, ImageFormat::Png).unwrap();
        assert_eq!(identity(1, 1).prepare(buf.get_ref()).unwrap(), vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn center_crop_drops_the_sides_that_stretch_keeps() {
        // 90x30: red, green and blue thirds. Cropping to a square keeps only the green middle.
        let image = RgbImage::from_fn(90, 30, |x, _| match x / 30 {
            0 => Rgb([255, 0, 0]),
            1 => Rgb([0, 255, 0]),
            _ => Rgb([0, 0, 255]),
        });
        let png = encode(&image, ImageFormat::Png);
        let crop = Preprocessor::new(spec(2, 2, Layout::Nchw, ColorOrder::Rgb, ResizeMode::CenterCrop), 1 << 20);
        let cropped = crop.prepare(&png).unwrap();
        // The filter reads a little past the crop box, as resize-then-crop pipelines do, so the
        // edges carry a trace of the neighbouring third.
        let (red, green, blue) = (&cropped[0..4], &cropped[4..8], &cropped[8..12]);
        assert!(green.iter().all(|v| *v > 192.0), "{cropped:?}");
        assert!(red.iter().chain(blue).all(|v| *v < 64.0), "{cropped:?}");

        let stretched = identity(2, 2).prepare(&png).unwrap();
        let (red, blue) = (&stretched[0..4], &stretched[8..12]);
        assert!(red[0] > 150.0 && red[1] < 10.0, "left column is mostly red: {stretched:?}");
        assert!(blue[1] > 150.0 && blue[0] < 10.0, "right column is mostly blue: {stretched:?}");
    }

    #[test]
    fn center_crop_of_a_tall_image_keeps_the_middle_rows() {
        let image =
            RgbImage::from_fn(20, 60, |_, y| if (20..40).contains(&y) { Rgb([0, 0, 90]) } else { Rgb([90, 0, 0]) });
        let crop = Preprocessor::new(spec(4, 4, Layout::Nhwc, ColorOrder::Rgb, ResizeMode::CenterCrop), 1 << 20);
        let tensor = crop.prepare(&encode(&image, ImageFormat::Png)).unwrap();
        let rows: Vec<&[f32]> = tensor.chunks(12).collect();
        assert_eq!(rows[1], [0.0, 0.0, 90.0].repeat(4), "inner rows are all middle");
        assert_eq!(rows[2], [0.0, 0.0, 90.0].repeat(4), "inner rows are all middle");
        assert!(rows[0].chunks(3).all(|px| px[0] < 20.0 && px[2] > 70.0), "edge rows are mostly middle: {tensor:?}");
    }

    #[test]
    fn bad_input_is_refused_with_the_right_error() {
        let pre = identity(2, 2);
        assert!(matches!(pre.prepare(b""), Err(PreprocessError::Empty)));
        assert!(matches!(pre.prepare(b"this is not an image at all"), Err(PreprocessError::UnknownFormat)));
        // A TIFF header: a real format, but not one we serve.
        assert!(matches!(pre.prepare(b"II*\0\x08\0\0\0\0\0\0\0"), Err(PreprocessError::UnknownFormat)));
    }

    #[test]
    fn a_huge_header_is_refused_before_decoding() {
        let err = identity(2, 2).prepare(&png_header(50_000, 50_000)).unwrap_err();
        assert!(
            matches!(err, PreprocessError::TooLarge { width: 50_000, height: 50_000, max_pixels: 16_777_216 }),
            "{err:?}"
        );
        // Within the limit the same header is only missing its data.
        let err = identity(2, 2).prepare(&png_header(64, 64)).unwrap_err();
        assert!(matches!(err, PreprocessError::Corrupt(_)), "{err:?}");
    }

    #[test]
    fn every_format_is_size_checked_from_its_header() {
        // Small valid files whose headers are patched to claim a huge size.
        let small = solid(4, 4, [1, 2, 3]);
        let mut bmp = encode(&small, ImageFormat::Bmp);
        bmp[18..22].copy_from_slice(&50_000i32.to_le_bytes());
        bmp[22..26].copy_from_slice(&50_000i32.to_le_bytes());
        let mut gif = encode(&small, ImageFormat::Gif);
        gif[6..8].copy_from_slice(&50_000u16.to_le_bytes());
        gif[8..10].copy_from_slice(&50_000u16.to_le_bytes());
        let mut jpeg = encode(&small, ImageFormat::Jpeg);
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        jpeg[sof + 5..sof + 7].copy_from_slice(&50_000u16.to_be_bytes());
        jpeg[sof + 7..sof + 9].copy_from_slice(&50_000u16.to_be_bytes());
        // VP8L after "RIFF....WEBPVP8L" + chunk size + 0x2f: 14 bits width - 1, 14 bits height - 1.
        let mut webp = encode(&small, ImageFormat::WebP);
        let flags = u32::from_le_bytes(webp[21..25].try_into().unwrap()) & 0xF000_0000;
        webp[21..25].copy_from_slice(&(flags | 9_999 | (9_999 << 14)).to_le_bytes());
        for (name, bytes, side) in
            [("bmp", bmp, 50_000), ("gif", gif, 50_000), ("jpeg", jpeg, 50_000), ("webp", webp, 10_000)]
        {
            let err = identity(2, 2).prepare(&bytes).unwrap_err();
            assert!(
                matches!(err, PreprocessError::TooLarge { width, height, .. } if width == side && height == side),
                "{name}: {err:?}"
            );
        }
    }

    #[test]
    fn the_pixel_limit_counts_width_times_height() {
        let png = encode(&solid(10, 10, [0, 0, 0]), ImageFormat::Png);
        let at_limit = Preprocessor::new(spec(2, 2, Layout::Nchw, ColorOrder::Rgb, ResizeMode::Stretch), 100);
        assert!(at_limit.prepare(&png).is_ok());
        let below = Preprocessor::new(spec(2, 2, Layout::Nchw, ColorOrder::Rgb, ResizeMode::Stretch), 99);
        assert!(matches!(below.prepare(&png), Err(PreprocessError::TooLarge { width: 10, height: 10, .. })));
    }

    #[test]
    fn a_truncated_jpeg_is_corrupt() {
        let jpeg = encode(&gradient(64, 64), ImageFormat::Jpeg);
        // The decoder itself pads the missing data and succeeds, which is why the marker walk exists.
        assert!(image::load_from_memory(&jpeg[..jpeg.len() / 2]).is_ok());
        for len in [jpeg.len() / 2, jpeg.len() - 1, 20] {
            let err = identity(2, 2).prepare(&jpeg[..len]).unwrap_err();
            assert!(matches!(err, PreprocessError::Corrupt(_)), "length {len}: {err:?}");
        }
    }

    #[test]
    fn a_jpeg_with_data_after_its_end_is_accepted() {
        // Motion photos and maker trailers append bytes after the end-of-image marker.
        let mut jpeg = encode(&gradient(16, 16), ImageFormat::Jpeg);
        jpeg.extend_from_slice(b"\0\0ftypmp42 trailing video, including \xFF\xD8 bytes");
        assert!(identity(2, 2).prepare(&jpeg).is_ok());
    }

    /// A little-endian TIFF block with one IFD entry: Orientation = `value`.
    fn exif_orientation(value: u16) -> Vec<u8> {
        let mut t = b"II*\0".to_vec();
        t.extend_from_slice(&8u32.to_le_bytes()); // first IFD right after the header
        t.extend_from_slice(&1u16.to_le_bytes()); // one entry
        t.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
        t.extend_from_slice(&3u16.to_le_bytes()); // SHORT
        t.extend_from_slice(&1u32.to_le_bytes()); // count
        t.extend_from_slice(&u32::from(value).to_le_bytes());
        t.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
        t
    }

    #[test]
    fn exif_orientation_turns_the_photo_upright() {
        use image::ImageEncoder;
        // 32x16: red left half, blue right half. Orientation 6 means "rotate 90 degrees clockwise
        // to display", after which red is on top.
        let img = RgbImage::from_fn(32, 16, |x, _| if x < 16 { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) });
        let mut jpeg = Vec::new();
        let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95);
        enc.set_exif_metadata(exif_orientation(6)).unwrap();
        enc.write_image(img.as_raw(), 32, 16, image::ExtendedColorType::Rgb8).unwrap();
        let (w, h, rgb) = identity(1, 1).decode(&jpeg).unwrap();
        assert_eq!((w, h), (16, 32));
        let top = &rgb[(2 * w as usize + 8) * 3..][..3];
        let bottom = &rgb[(29 * w as usize + 8) * 3..][..3];
        assert!(top[0] > 200 && top[2] < 60, "top is {top:?}");
        assert!(bottom[2] > 200 && bottom[0] < 60, "bottom is {bottom:?}");
    }
}
