//! Model cards: what the sidecar needs to know to serve any ONNX embedding model.
//!
//! A card (JSON) names the graph's input and output, how images are resized and normalised, the
//! similarity and default match threshold, and the model's variants (fp32 / fp16 / int8), each with
//! its file and sha256. The sidecar never assumes anything about a model that is not on its card, so
//! a user can bring an SSCD or CLIP export by writing a card (see docs/model-card.md).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// File name of a card inside a model directory.
pub const CARD_FILE: &str = "card.json";

/// A model card as stored on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// Model name, reported in responses and metrics.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// How the graph's input is laid out and prepared.
    pub input: InputSpec,
    /// Which output holds the embedding.
    pub output: OutputSpec,
    /// Similarity between embeddings; only cosine is supported.
    pub similarity: Similarity,
    /// Score at or above which an image matches a reference, unless a profile sets its own.
    pub match_threshold: f32,
    /// Robust matching: how embedding scores and keypoint verification combine (absent: every
    /// request matches by the embedding alone, as `mode=global` does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
    /// Variant files keyed by precision.
    pub variants: Variants,
}

/// How robust matching decides, per reference with keypoints (docs/model-card.md).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verification {
    /// A score at or above this (or the profile's threshold, when higher) matches by itself.
    pub direct: f32,
    /// Below `direct`, a reference scoring at least this is checked by its keypoints.
    pub floor: f32,
    /// Keypoints agreeing with one similarity transform that make a checked reference a match.
    pub min_inliers: u32,
}

/// The model input: tensor name, layout, size and pixel normalisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    /// Graph input name.
    pub name: String,
    /// Tensor layout.
    pub layout: Layout,
    /// Width the image is resized to, in pixels.
    pub width: u32,
    /// Height the image is resized to, in pixels.
    pub height: u32,
    /// Channel order.
    #[serde(default)]
    pub color: ColorOrder,
    /// How the image is fitted to width x height.
    pub resize: ResizeMode,
    /// Per-channel mean subtracted from 0..255 pixel values.
    pub mean: [f32; 3],
    /// Per-channel divisor applied after the mean.
    pub std: [f32; 3],
}

/// Tensor layout of the image input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    /// [N, C, H, W]
    #[serde(rename = "NCHW")]
    Nchw,
    /// [N, H, W, C]
    #[serde(rename = "NHWC")]
    Nhwc,
}

/// Channel order of the image input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ColorOrder {
    /// Red, green, blue.
    #[default]
    #[serde(rename = "RGB")]
    Rgb,
    /// Blue, green, red (OpenCV-trained models).
    #[serde(rename = "BGR")]
    Bgr,
}

/// How an image is fitted to the model's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Resize straight to width x height, ignoring the aspect ratio.
    Stretch,
    /// Resize the shorter side to fit, then cut the centre.
    CenterCrop,
}

/// The model output that holds the embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputSpec {
    /// Graph output name.
    pub name: String,
    /// Embedding dimension.
    pub dim: usize,
}

/// Similarity measure between embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Similarity {
    /// Cosine of the angle between embeddings, in -1..=1.
    Cosine,
}

/// Variant files by precision; a card needs at least one.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Variants {
    /// Full precision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp32: Option<VariantFile>,
    /// Half precision weights (GPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp16: Option<VariantFile>,
    /// 8-bit quantised weights (CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub int8: Option<VariantFile>,
}

/// One variant's file, relative to the card, and its expected checksum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantFile {
    /// Path relative to the card's directory (or absolute).
    pub file: PathBuf,
    /// Lower-case hex sha256 of the file; checked before the model is loaded.
    pub sha256: String,
}

/// Model precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// 32-bit floats.
    Fp32,
    /// 16-bit floats.
    Fp16,
    /// 8-bit integers.
    Int8,
}

impl Variant {
    /// The variant's name as on the card and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Fp32 => "fp32",
            Variant::Fp16 => "fp16",
            Variant::Int8 => "int8",
        }
    }
}

/// The user's trade-off, which picks the variant and graph optimisation (shared with the
/// InferencePool spec).
pub use inferpool_crds::Optimization;

/// Variants in order of preference for this level on a GPU or on the CPU.
///
/// fp16 only pays off on GPUs (CPUs up-convert it, which made it 0.7x fp32 here). The default
/// model's int8 variant (dynamic quantisation) is the smallest but measured slower than fp32 on
/// the CPU, so only Memory picks it there; Speed picks what is fastest. See docs/models.md.
pub fn preference(level: Optimization, gpu: bool) -> &'static [Variant] {
    use Variant::*;
    match (level, gpu) {
        (Optimization::Accuracy, _) => &[Fp32, Fp16, Int8],
        (Optimization::Balanced, true) | (Optimization::Speed, true) => &[Fp16, Fp32, Int8],
        (Optimization::Memory, true) => &[Fp16, Fp32, Int8],
        (Optimization::Balanced, false) | (Optimization::Speed, false) => &[Fp32, Int8, Fp16],
        (Optimization::Memory, false) => &[Int8, Fp32, Fp16],
    }
}

/// Why a card or model file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The card or model file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The card is not valid JSON for a model card.
    #[error("invalid model card {path}: {source}")]
    Parse {
        /// The card.
        path: PathBuf,
        /// What serde found.
        source: serde_json::Error,
    },
    /// The card parsed but its values cannot work.
    #[error("invalid model card {path}: {}", .problems.join("; "))]
    Invalid {
        /// The card.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<String>,
    },
    /// A variant file's sha256 differs from the card.
    #[error(
        "{path}: sha256 is {actual} but the card says {expected}; regenerate the model (make setup) or fix the card"
    )]
    Checksum {
        /// The model file.
        path: PathBuf,
        /// From the card.
        expected: String,
        /// Of the file.
        actual: String,
    },
}

/// A card with its location, ready to pick a variant from.
#[derive(Debug, Clone)]
pub struct LoadedCard {
    /// The card itself.
    pub card: ModelCard,
    /// Directory that relative variant paths are resolved against.
    pub dir: PathBuf,
    /// Set when `--model` named one .onnx file: only that variant may be used.
    pub pinned: Option<Variant>,
}

impl LoadedCard {
    /// Reads a card from a card file, a directory holding `card.json`, or an `.onnx` file that a
    /// `card.json` beside it lists (which pins that variant).
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let is_onnx = path.extension().is_some_and(|e| e == "onnx");
        let card_path = if path.is_dir() {
            path.join(CARD_FILE)
        } else if is_onnx {
            path.with_file_name(CARD_FILE)
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&card_path)
            .map_err(|source| ModelError::Read { path: card_path.clone(), source })?;
        let card: ModelCard =
            serde_json::from_str(&text).map_err(|source| ModelError::Parse { path: card_path.clone(), source })?;
        let dir = card_path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut loaded = LoadedCard { card, dir, pinned: None };
        let mut problems = loaded.card.problems();
        if is_onnx {
            let name = path.file_name();
            let pinned = loaded.variants().find(|(_, f)| f.file.file_name() == name).map(|(v, _)| v);
            loaded.pinned = pinned;
            if loaded.pinned.is_none() {
                problems.push(format!("no variant lists {}", path.display()));
            }
        }
        if problems.is_empty() { Ok(loaded) } else { Err(ModelError::Invalid { path: card_path, problems }) }
    }

    /// The card's variants that exist, in fp32, fp16, int8 order.
    pub fn variants(&self) -> impl Iterator<Item = (Variant, &VariantFile)> {
        let v = &self.card.variants;
        [(Variant::Fp32, &v.fp32), (Variant::Fp16, &v.fp16), (Variant::Int8, &v.int8)]
            .into_iter()
            .filter_map(|(k, f)| f.as_ref().map(|f| (k, f)))
    }

    /// Picks the variant for an optimisation level on a GPU or CPU, and returns its resolved path.
    pub fn choose(&self, level: Optimization, gpu: bool) -> (Variant, PathBuf) {
        let pick = self.pinned.into_iter().chain(preference(level, gpu).iter().copied());
        let (variant, file) = pick
            .filter_map(|want| self.variants().find(|(v, _)| *v == want))
            .next()
            .or_else(|| self.variants().next())
            .map(|(v, f)| (v, f.file.clone()))
            .unwrap_or((Variant::Fp32, PathBuf::new()));
        (variant, self.dir.join(file))
    }

    /// Verifies a variant file against the sha256 on the card.
    pub fn verify(&self, variant: Variant, path: &Path) -> Result<(), ModelError> {
        let expected = self
            .variants()
            .find(|(v, _)| *v == variant)
            .map(|(_, f)| f.sha256.to_ascii_lowercase())
            .unwrap_or_default();
        let actual = sha256_file(path)?;
        if actual == expected {
            Ok(())
        } else {
            Err(ModelError::Checksum { path: path.to_path_buf(), expected, actual })
        }
    }
}

impl ModelCard {
    /// Every value that cannot work, so a user fixes the card in one go.
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let input = &self.input;
        if input.name.is_empty() {
            p.push("input.name is empty".to_owned());
        }
        if !(1..=8192).contains(&input.width) || !(1..=8192).contains(&input.height) {
            p.push(format!("input size {}x{} must be within 1..=8192", input.width, input.height));
        }
        if input.std.iter().any(|s| !s.is_finite() || *s == 0.0) || input.mean.iter().any(|m| !m.is_finite()) {
            p.push("input.mean must be finite and input.std finite and non-zero".to_owned());
        }
        if self.output.name.is_empty() {
            p.push("output.name is empty".to_owned());
        }
        if self.output.dim == 0 {
            p.push("output.dim must be positive".to_owned());
        }
        if !(-1.0..=1.0).contains(&self.match_threshold) {
            p.push(format!("match_threshold {} must be within -1..=1 for cosine", self.match_threshold));
        }
        if let Some(v) = &self.verification
            && (!(-1.0..=1.0).contains(&v.floor) || !(v.floor..=1.0).contains(&v.direct) || v.min_inliers < 3)
        {
            p.push(format!(
                "verification needs -1 <= floor <= direct <= 1 and min_inliers >= 3, got floor {}, direct {}, min_inliers {}",
                v.floor, v.direct, v.min_inliers
            ));
        }
        let v = &self.variants;
        if v.fp32.is_none() && v.fp16.is_none() && v.int8.is_none() {
            p.push("variants lists no model file".to_owned());
        }
        for f in [&v.fp32, &v.fp16, &v.int8].into_iter().flatten() {
            if f.sha256.len() != 64 || !f.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                p.push(format!("sha256 of {} is not 64 hex digits", f.file.display()));
            }
        }
        p
    }
}

/// Lower-case hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let read_err = |source| ModelError::Read { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(read_err)?;
    Ok(hex::encode(hasher.finalize()))
}
