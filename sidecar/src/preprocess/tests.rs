//! Decoding, resizing and normalisation of every format, and the bad-input table.

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
    let image = RgbImage::from_fn(20, 60, |_, y| if (20..40).contains(&y) { Rgb([0, 0, 90]) } else { Rgb([90, 0, 0]) });
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

/// `jpeg` with its frame header claiming `width` x `height`.
fn with_declared_size(mut jpeg: Vec<u8>, width: u16, height: u16) -> Vec<u8> {
    let sof = jpeg.windows(2).position(|w| w[0] == 0xFF && matches!(w[1], 0xC0 | 0xC2)).expect("a frame header");
    jpeg[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    jpeg
}

#[test]
fn a_jpeg_whose_header_claims_more_than_its_data_holds_is_corrupt() {
    let rgb: Vec<u8> = gradient(640, 400).into_raw();
    for kind in [JpegKind::Baseline, JpegKind::Progressive] {
        let honest = turbo_jpeg(640, 400, &rgb, turbojpeg::PixelFormat::RGB, kind);
        let lying = with_declared_size(honest.clone(), 6000, 6000);
        // The decoder pads the missing data with grey and succeeds: the check is what refuses it.
        assert!(image::load_from_memory(&lying).is_ok(), "{kind:?}");
        let pre = Preprocessor::new(spec(224, 224, Layout::Nchw, ColorOrder::Rgb, ResizeMode::Stretch), 1 << 26);
        for mode in [JpegDecode::Reduced, JpegDecode::Full] {
            let err = pre.clone().with_jpeg_decode(mode).prepare(&lying).unwrap_err();
            let PreprocessError::Corrupt(message) = &err else { panic!("{kind:?} {mode:?}: {err:?}") };
            assert!(message.contains("6000x6000") && message.contains("does not match"), "{message}");
            assert!(pre.clone().with_jpeg_decode(mode).prepare(&honest).is_ok(), "{kind:?} {mode:?}");
        }
    }
}

#[test]
fn flat_and_tiny_jpegs_are_not_mistaken_for_lying_ones() {
    // The flattest pictures compress best: each block still costs its minimum.
    for (w, h) in [(8, 8), (1, 1), (17, 9), (1024, 768)] {
        let jpeg = encode(&solid(w, h, [128, 128, 128]), ImageFormat::Jpeg);
        assert!(identity(2, 2).prepare(&jpeg).is_ok(), "{w}x{h}");
        let rgb = solid(w, h, [0, 0, 0]).into_raw();
        for kind in [JpegKind::Baseline, JpegKind::Progressive, JpegKind::Grey] {
            let jpeg = turbo_jpeg(w as usize, h as usize, &rgb, turbojpeg::PixelFormat::RGB, kind);
            assert!(identity(2, 2).prepare(&jpeg).is_ok(), "{w}x{h} {kind:?}");
        }
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
fn exif_orientation_turns_the_photo_upright_in_both_decode_modes() {
    use image::ImageEncoder;
    // 32x16: red left half, blue right half. Orientation 6 means "rotate 90 degrees clockwise
    // to display", after which red is on top and the picture is 16x32.
    let img = RgbImage::from_fn(32, 16, |x, _| if x < 16 { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) });
    let mut jpeg = Vec::new();
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95);
    enc.set_exif_metadata(exif_orientation(6)).unwrap();
    enc.write_image(img.as_raw(), 32, 16, image::ExtendedColorType::Rgb8).unwrap();
    // (mode, model input, decoded size): the reduced scale is chosen for the upright picture, so
    // a 4x8 input gets 1/4 (4x8), not the 1/8 that the stored 32x16 would allow (2x4 upright).
    let cases = [
        (JpegDecode::Full, (1, 1), (16, 32)),
        (JpegDecode::Reduced, (1, 1), (2, 4)),
        (JpegDecode::Reduced, (4, 8), (4, 8)),
    ];
    for (mode, (iw, ih), want) in cases {
        let pre = Preprocessor::new(spec(iw, ih, Layout::Nchw, ColorOrder::Rgb, ResizeMode::Stretch), 1 << 24)
            .with_jpeg_decode(mode);
        let (w, h, rgb) = pre.decode_upright(&jpeg).unwrap();
        assert_eq!((w, h), want, "{mode:?} for {iw}x{ih}");
        let at = |row: u32| &rgb[((row * w + w / 2) * 3) as usize..][..3];
        let (top, bottom) = (at(h / 8), at(h - 1 - h / 8));
        assert!(top[0] > 200 && top[2] < 60, "{mode:?}: top is {top:?}");
        assert!(bottom[2] > 200 && bottom[0] < 60, "{mode:?}: bottom is {bottom:?}");
    }
}

/// A JPEG made by libjpeg-turbo from `pixels` in `format`, with the given colour space and scan
/// mode (the kinds phones, editors and print tools write).
fn turbo_jpeg(width: usize, height: usize, pixels: &[u8], format: turbojpeg::PixelFormat, kind: JpegKind) -> Vec<u8> {
    let mut c = turbojpeg::Compressor::new().unwrap();
    c.set_quality(92).unwrap();
    match kind {
        JpegKind::Baseline => {}
        JpegKind::Progressive => c.set_progressive(true).unwrap(),
        JpegKind::Grey => {
            c.set_subsamp(turbojpeg::Subsamp::Gray).unwrap();
        }
        JpegKind::Cmyk => c.set_colorspace(turbojpeg::Colorspace::YCCK).unwrap(),
    }
    let pitch = width * format.size();
    let image = turbojpeg::Image { pixels, width, pitch, height, format };
    c.compress_to_owned(image).unwrap().to_vec()
}

#[derive(Debug, Clone, Copy)]
enum JpegKind {
    Baseline,
    Progressive,
    Grey,
    Cmyk,
}

#[test]
fn every_kind_of_jpeg_decodes_alike_in_both_modes() {
    // 256x128: the left half one colour, the right half another, so a wrong channel order, a
    // lost colour or a mirrored image all show.
    let (w, h) = (256usize, 128usize);
    let rgb: Vec<u8> = (0..w * h).flat_map(|i| if i % w < w / 2 { [200u8, 60, 30] } else { [20, 90, 220] }).collect();
    // Print files store CMYK inverted (Adobe's convention: 255 = no ink), so with no black ink
    // the stored C, M, Y are the R, G, B of the same colours.
    let cmyk: Vec<u8> =
        (0..w * h).flat_map(|i| if i % w < w / 2 { [200u8, 60, 30, 255] } else { [20, 90, 220, 255] }).collect();
    let cases = [
        (JpegKind::Baseline, turbo_jpeg(w, h, &rgb, turbojpeg::PixelFormat::RGB, JpegKind::Baseline)),
        (JpegKind::Progressive, turbo_jpeg(w, h, &rgb, turbojpeg::PixelFormat::RGB, JpegKind::Progressive)),
        (JpegKind::Grey, turbo_jpeg(w, h, &rgb, turbojpeg::PixelFormat::RGB, JpegKind::Grey)),
        (JpegKind::Cmyk, turbo_jpeg(w, h, &cmyk, turbojpeg::PixelFormat::CMYK, JpegKind::Cmyk)),
    ];
    for (kind, jpeg) in cases {
        let header = turbojpeg::read_header(&jpeg).unwrap();
        assert_eq!(header.is_progressive, matches!(kind, JpegKind::Progressive), "{kind:?}");
        let pre = |mode| {
            Preprocessor::new(spec(16, 8, Layout::Nhwc, ColorOrder::Rgb, ResizeMode::Stretch), 1 << 24)
                .with_jpeg_decode(mode)
        };
        let (full, reduced) = (pre(JpegDecode::Full), pre(JpegDecode::Reduced));
        let (rw, rh, _) = reduced.decode_upright(&jpeg).unwrap();
        let want_reduced = if matches!(kind, JpegKind::Cmyk) { (256, 128) } else { (32, 16) };
        assert_eq!((rw, rh), want_reduced, "{kind:?}: CMYK keeps the general decoder, the rest decode at 1/8");
        let (a, b) = (full.prepare(&jpeg).unwrap(), reduced.prepare(&jpeg).unwrap());
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(worst <= 6.0, "{kind:?}: reduced and full differ by up to {worst}");
        // The two halves keep their colours (grey: their brightness).
        let (left, right) = (&a[(4 * 16 + 2) * 3..][..3], &a[(4 * 16 + 13) * 3..][..3]);
        match kind {
            JpegKind::Grey => assert!(
                left[0] == left[1] && left[1] == left[2] && (left[0] - right[0]).abs() > 5.0,
                "{left:?} {right:?}"
            ),
            _ => assert!(
                left[0] > 150.0 && left[2] < 80.0 && right[2] > 150.0 && right[0] < 80.0,
                "{kind:?}: {left:?} {right:?}"
            ),
        }
    }
}
