//! Judging an image against a profile by every signal the profile holds: the embedding (cosine
//! against the threshold) and PDQ hashes (Hamming distance against the profile's bound).

use serde::Serialize;

use super::Profile;
use crate::pdq::{self, Pdq};

/// What is known about the image being matched.
#[derive(Debug, Clone, Copy, Default)]
pub struct Probe<'a> {
    /// Its unit-length embedding, when some profile needed it.
    pub embedding: Option<&'a [f32]>,
    /// Its PDQ hash and quality, when some profile needed it.
    pub pdq: Option<(Pdq, u8)>,
}

/// Which signal found the match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SignalKind {
    /// Cosine of embeddings at or above the threshold.
    Embedding,
    /// Hamming distance of PDQ hashes at or below the bound.
    Pdq,
}

/// The outcome of matching an image against one profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict<'a> {
    /// The signal that matched; None when none did.
    pub signal: Option<SignalKind>,
    /// The matched reference, or the closest one when nothing matched.
    pub reference: Option<&'a str>,
    /// Best cosine over the embedding references (None without embedding references).
    pub score: Option<f32>,
    /// Smallest Hamming distance over the usable PDQ references (None without a usable hash).
    pub distance: Option<u32>,
}

impl Profile {
    /// Judges the image; an embedding match is preferred when both signals match. A query hash
    /// of quality under 50 is not used, nor are references of such quality.
    pub fn judge<'a>(&'a self, probe: &Probe<'_>, default_threshold: f32) -> Verdict<'a> {
        let by_embedding = probe.embedding.and_then(|q| self.best_match(q));
        let by_pdq =
            probe.pdq.filter(|(_, q)| *q >= pdq::MIN_MATCH_QUALITY).and_then(|(hash, _)| self.nearest_pdq(&hash));
        let threshold = self.threshold.unwrap_or(default_threshold);
        let (signal, reference) = match (by_embedding, by_pdq) {
            (Some((r, score)), _) if score >= threshold => (Some(SignalKind::Embedding), Some(r)),
            (_, Some((r, d))) if d <= self.pdq_distance() => (Some(SignalKind::Pdq), Some(r)),
            (Some((r, _)), _) | (None, Some((r, _))) => (None, Some(r)),
            (None, None) => (None, None),
        };
        Verdict { signal, reference, score: by_embedding.map(|m| m.1), distance: by_pdq.map(|m| m.1) }
    }

    /// The usable PDQ reference nearest to the hash: (reference id, Hamming distance).
    fn nearest_pdq(&self, hash: &Pdq) -> Option<(&str, u32)> {
        self.references
            .iter()
            .filter(|r| r.pdq_usable())
            .filter_map(|r| Some((r.id.as_str(), r.pdq.as_ref()?.distance(hash))))
            .min_by_key(|m| m.1)
    }
}
