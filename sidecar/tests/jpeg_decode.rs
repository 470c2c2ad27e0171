//! Reduced-resolution JPEG decoding against full decoding, on real photos through the real model:
//! the embeddings agree (cosine >= 0.99 for every photo and size) and copies still separate from
//! different photos at the card's threshold.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use image::DynamicImage;
use inferpool_sidecar::config::ProviderChoice;
use inferpool_sidecar::engine::{EngineOptions, OnnxEngine};
use inferpool_sidecar::matcher;
use inferpool_sidecar::model::{LoadedCard, Optimization};
use inferpool_sidecar::preprocess::{JpegDecode, Preprocessor};

/// scikit-image's bundled photos (the model card's evaluation set).
const PHOTOS: [&str; 20] = [
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "color.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "logo.png",
    "moon.png",
    "motorcycle_left.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
];

/// Sizes users upload: as stored (scale 1 or 1/2), a 1080p frame (1/4) and a 12 MP phone photo
/// (1/8 for a 224x224 input).
const SIZES: [Option<(u32, u32)>; 3] = [None, Some((1920, 1080)), PHONE];
const PHONE: Option<(u32, u32)> = Some((4032, 3024));

struct Model {
    engine: OnnxEngine,
    full: Preprocessor,
    reduced: Preprocessor,
    threshold: f32,
}

impl Model {
    fn load() -> Model {
        let card = LoadedCard::load(&card()).unwrap();
        let opts = EngineOptions {
            library: None,
            provider: ProviderChoice::Cpu,
            optimization: Optimization::Accuracy,
            threads: None,
            sessions: 1,
        };
        let engine = OnnxEngine::load(&card, &opts).unwrap();
        let pre = Preprocessor::new(card.card.input.clone(), 40_000_000);
        Model {
            engine,
            full: pre.clone().with_jpeg_decode(JpegDecode::Full),
            reduced: pre.with_jpeg_decode(JpegDecode::Reduced),
            threshold: card.card.match_threshold,
        }
    }

    fn embed(&mut self, mode: JpegDecode, jpeg: &[u8]) -> Vec<f32> {
        let pre = if mode == JpegDecode::Full { &self.full } else { &self.reduced };
        let mut v = self.engine.run(pre.prepare(jpeg).unwrap(), 1).unwrap().remove(0);
        assert!(matcher::normalize(&mut v));
        v
    }
}

/// The photo at `size` (as stored when None) as a JPEG of `quality`, resized with a SIMD
/// bilinear filter and encoded by libjpeg-turbo (4:2:0, as phones write).
fn photo_jpeg(img: &DynamicImage, size: Option<(u32, u32)>, quality: i32) -> Vec<u8> {
    use fast_image_resize::{PixelType, Resizer, images::Image};
    let rgb = img.to_rgb8();
    let (w, h) = size.unwrap_or(rgb.dimensions());
    let src = Image::from_vec_u8(rgb.width(), rgb.height(), rgb.into_raw(), PixelType::U8x3).unwrap();
    let mut dst = Image::new(w, h, PixelType::U8x3);
    Resizer::new().resize(&src, &mut dst, None).unwrap();
    let image = turbojpeg::Image {
        pixels: dst.buffer(),
        width: w as usize,
        pitch: 3 * w as usize,
        height: h as usize,
        format: turbojpeg::PixelFormat::RGB,
    };
    turbojpeg::compress(image, quality, turbojpeg::Subsamp::Sub2x2).unwrap().to_vec()
}

/// One pass over the photo set for both checks, since making 12 MP photos is the slow part.
#[test]
fn reduced_decoding_matches_full_decoding_and_keeps_copies_apart() {
    let mut model = Model::load();
    let mut worst = (1.0f32, String::new());
    let (mut references, mut copies) = (Vec::new(), Vec::new());
    for name in PHOTOS {
        let original = decode(&photo(name));
        for size in SIZES {
            let jpeg = photo_jpeg(&original, size, 90);
            let (full, reduced) = (model.embed(JpegDecode::Full, &jpeg), model.embed(JpegDecode::Reduced, &jpeg));
            let cos = matcher::cosine(&full, &reduced);
            assert!(cos >= 0.99, "{name} at {size:?}: cosine {cos} between reduced and full decoding");
            if cos < worst.0 {
                worst = (cos, format!("{name} at {size:?}"));
            }
            if size == PHONE {
                // The reference a full decode of the 12 MP photo made, and two re-uploads
                // (recompressed at quality 40; downscaled by half) seen through reduced decoding.
                references.push(full);
                let recompressed = photo_jpeg(&original, PHONE, 40);
                let halved = photo_jpeg(&original, Some((2016, 1512)), 85);
                copies.push([recompressed, halved].map(|c| model.embed(JpegDecode::Reduced, &c)));
            }
        }
    }
    println!("lowest cosine, reduced vs full decoding: {:.4} ({})", worst.0, worst.1);
    let (mut min_copy, mut max_other) = (f32::MAX, f32::MIN);
    for (i, pair) in copies.iter().enumerate() {
        for q in pair {
            min_copy = min_copy.min(matcher::cosine(q, &references[i]));
            for (j, r) in references.iter().enumerate() {
                if j != i {
                    max_other = max_other.max(matcher::cosine(q, r));
                }
            }
        }
    }
    println!("reduced decoding at 12 MP: min copy {min_copy:.3}, max different {max_other:.3}");
    assert!(min_copy >= model.threshold, "a copy scored {min_copy}, below the threshold {}", model.threshold);
    assert!(
        max_other < model.threshold,
        "different photos scored {max_other}, above the threshold {}",
        model.threshold
    );
}
