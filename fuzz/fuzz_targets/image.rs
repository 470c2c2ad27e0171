//! Any bytes as an uploaded image: format sniffing, header and size checks, the JPEG marker walk,
//! decoding (reduced and full JPEG decoding), orientation and resizing. It must return an image or
//! an error, never panic, hang or allocate past the pixel limit.
#![no_main]

use inferpool_sidecar::model::{ColorOrder, InputSpec, Layout, ResizeMode};
use inferpool_sidecar::preprocess::Preprocessor;
use inferpool_sidecar::preprocess::jpeg::JpegDecode;
use libfuzzer_sys::fuzz_target;

/// Small enough that a crafted header cannot make one iteration slow.
const MAX_PIXELS: u64 = 1 << 22;

fuzz_target!(|data: &[u8]| {
    let spec = InputSpec {
        name: "input".to_owned(),
        layout: Layout::Nchw,
        width: 32,
        height: 32,
        color: ColorOrder::Rgb,
        resize: ResizeMode::CenterCrop,
        mean: [0.0; 3],
        std: [1.0; 3],
    };
    for mode in [JpegDecode::Reduced, JpegDecode::Full] {
        let pre = Preprocessor::new(spec.clone(), MAX_PIXELS).with_jpeg_decode(mode);
        if let Ok(pixels) = pre.prepare_pixels(data) {
            assert_eq!(pixels.len(), 32 * 32 * 3, "an accepted image has the input's size");
        }
    }
});
