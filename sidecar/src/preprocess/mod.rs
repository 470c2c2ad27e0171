//! Image bytes -> model input tensor.
//!
//! Everything a model needs to see an image the way it was trained comes from its card's
//! [`InputSpec`]: size, resize mode, channel order, layout and normalisation. The work is CPU-bound
//! (decode, SIMD resize, one pass of normalisation), so callers run it on the decode pool
//! (`embed::decode`), never on the async reactor.
//!
//! JPEGs, what users upload, are decoded at reduced resolution when the model input allows
//! ([`jpeg`]); every other format, and the JPEGs that path declines, go through the `image` crate.
//!
//! Untrusted input is refused as early and as cheaply as possible: the format comes from the magic
//! bytes, and the pixel count from the header before anything is decoded, so a tiny file that claims
//! to be 50000x50000 costs a header parse, not gigabytes. `image::Limits` on the decoder are a second
//! guard should a header lie about what follows.

use std::io::Cursor;

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::metadata::Orientation;
use image::{ImageDecoder, ImageFormat, ImageReader, Limits};

use crate::model::{ColorOrder, InputSpec, Layout, ResizeMode};

pub mod jpeg;

pub use jpeg::JpegDecode;

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
    jpeg: JpegDecode,
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
        Self { input, max_pixels, jpeg: JpegDecode::default(), channels }
    }

    /// The same preprocessor with JPEGs decoded the given way.
    pub fn with_jpeg_decode(mut self, jpeg: JpegDecode) -> Self {
        self.jpeg = jpeg;
        self
    }

    /// How JPEGs are decoded.
    pub fn jpeg_decode(&self) -> JpegDecode {
        self.jpeg
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
        let (width, height, rgb) = self.decode_upright(bytes)?;
        self.resize_rgb(width, height, rgb)
    }

    /// Resizes decoded packed RGB8 to the card's size, as [`Preprocessor::prepare_pixels`] does
    /// after decoding (for callers that decode themselves, such as the decoder benchmark).
    pub fn resize_rgb(&self, width: u32, height: u32, rgb: Vec<u8>) -> Result<Vec<u8>, PreprocessError> {
        Ok(self.resize(width, height, rgb)?.into_vec())
    }

    /// Width and height of the model input.
    pub fn input_size(&self) -> (u32, u32) {
        (self.input.width, self.input.height)
    }

    /// Decodes to packed RGB8, upright, checking the header's size before the pixels are read.
    /// A JPEG may come back smaller than its header says (reduced decoding), never smaller than
    /// the model input; with [`JpegDecode::Full`] every image comes back at its own size.
    pub fn decode_upright(&self, bytes: &[u8]) -> Result<(u32, u32, Vec<u8>), PreprocessError> {
        if bytes.is_empty() {
            return Err(PreprocessError::Empty);
        }
        let reader = reader(bytes)?;
        let format = reader.format();
        // A PNG's size comes from IHDR before any decoder exists (see `png_ihdr_size`).
        if let Some((width, height)) = png_ihdr_size(bytes) {
            self.check_size(width, height)?;
        }
        // Creating a decoder parses the header only; the pixels are read further down.
        let mut decoder = reader.into_decoder().map_err(corrupt)?;
        let (width, height) = decoder.dimensions();
        self.check_size(width, height)?;
        if format == Some(ImageFormat::Jpeg) {
            jpeg::check_complete(bytes)?;
        }
        // Phones store photos sideways and say so in EXIF; a user expects the upright picture.
        let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
        if format == Some(ImageFormat::Jpeg) && self.jpeg == JpegDecode::Reduced {
            let (up_w, up_h) = if turns_sideways(orientation) { (height, width) } else { (width, height) };
            let scale = jpeg::scale_for(up_w, up_h, self.input.width, self.input.height);
            if let Some((w, h, rgb)) = jpeg::decode_scaled(bytes, scale) {
                return upright(w, h, rgb, orientation);
            }
        }
        let side = u32::try_from(self.max_pixels).unwrap_or(u32::MAX);
        let mut limits = Limits::default();
        limits.max_image_width = Some(side);
        limits.max_image_height = Some(side);
        // 8 bytes a pixel covers the widest output a decoder produces here (16-bit RGBA PNG), plus
        // room for the decoders' own buffers.
        limits.max_alloc = Some(self.max_pixels.saturating_mul(8).saturating_add(64 << 20));
        decoder.set_limits(limits).map_err(corrupt)?;
        let mut image = image::DynamicImage::from_decoder(decoder).map_err(corrupt)?;
        if image.width() != width || image.height() != height {
            return Err(PreprocessError::Corrupt("decoded size differs from the header".to_owned()));
        }
        image.apply_orientation(orientation);
        Ok((image.width(), image.height(), image.into_rgb8().into_raw()))
    }

    /// Refuses an image of more pixels than allowed.
    fn check_size(&self, width: u32, height: u32) -> Result<(), PreprocessError> {
        if u64::from(width) * u64::from(height) > self.max_pixels {
            return Err(PreprocessError::TooLarge { width, height, max_pixels: self.max_pixels });
        }
        Ok(())
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

/// Whether an EXIF orientation swaps width and height.
fn turns_sideways(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH
    )
}

/// Packed RGB8 turned upright by its EXIF orientation.
fn upright(width: u32, height: u32, rgb: Vec<u8>, o: Orientation) -> Result<(u32, u32, Vec<u8>), PreprocessError> {
    if o == Orientation::NoTransforms {
        return Ok((width, height, rgb));
    }
    let image = image::RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| PreprocessError::Corrupt("decoded pixels do not fill the image".to_owned()))?;
    let mut image = image::DynamicImage::ImageRgb8(image);
    image.apply_orientation(o);
    Ok((image.width(), image.height(), image.into_rgb8().into_raw()))
}

fn corrupt(e: image::ImageError) -> PreprocessError {
    PreprocessError::Corrupt(e.to_string())
}

#[cfg(test)]
mod tests;
