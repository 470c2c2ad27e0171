//! Judging an image against a profile by every signal the profile holds: the embedding (cosine
//! against the threshold), keypoints (verification of a candidate by geometry) and PDQ hashes
//! (Hamming distance against the profile's bound).
//!
//! In the robust mode (the default when the model card has `verification`) a score of at least
//! `max(threshold, direct)` matches by itself; a lower score from `floor` up matches when the
//! reference's keypoints and the image's agree on at least `min_inliers` points. References
//! without keypoints (given as embeddings, or written before keypoints existed) keep the global
//! rule, score >= threshold, which the `global` mode applies to every reference.

use serde::{Deserialize, Serialize};

use super::{Profile, Reference};
use crate::keypoints::{self, Keypoints};
use crate::model::Verification;
use crate::pdq::{self, Pdq};

/// At most this many references of one profile are checked by keypoints for one image, the
/// best-scoring first: it bounds the cost of an image that resembles many references.
pub const MAX_CHECKED: usize = 8;

/// How an image is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Embedding, then keypoint verification of candidates (when the card has `verification`).
    #[default]
    Robust,
    /// The embedding alone against the threshold: the fastest, and blind to heavy edits.
    Global,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "robust" => Ok(Mode::Robust),
            "global" => Ok(Mode::Global),
            other => Err(format!("mode must be robust or global, got {other:?}")),
        }
    }
}

/// What the service decides with, besides the profile's own settings.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// The card's `match_threshold`, for profiles without their own.
    pub threshold: f32,
    /// The card's verification settings; None matches every request globally.
    pub verification: Option<Verification>,
    /// The request's mode.
    pub mode: Mode,
}

impl Rules {
    /// The verification settings in force for this request, if it is robust.
    fn robust(&self) -> Option<Verification> {
        self.verification.filter(|_| self.mode == Mode::Robust)
    }
}

/// What is known about the image being matched.
#[derive(Debug, Clone, Copy, Default)]
pub struct Probe<'a> {
    /// Its unit-length embedding, when some profile needed it.
    pub embedding: Option<&'a [f32]>,
    /// Its PDQ hash and quality, when some profile needed it.
    pub pdq: Option<(Pdq, u8)>,
    /// Its keypoints, once a verdict asked for them.
    pub keypoints: Option<&'a Keypoints>,
}

/// Which signal found the match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SignalKind {
    /// Cosine of embeddings at or above the threshold.
    Embedding,
    /// A candidate by embedding whose keypoints agree with the image's.
    Keypoints,
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
    /// The cosine of that reference (None without embedding references).
    pub score: Option<f32>,
    /// Smallest Hamming distance over the usable PDQ references (None without a usable hash).
    pub distance: Option<u32>,
    /// Most agreeing keypoints over the references checked (None when none was).
    pub inliers: Option<u32>,
    /// Candidates wait for the image's keypoints: judge again with them.
    pub needs_keypoints: bool,
}

impl Profile {
    /// Judges the image; an embedding match is preferred, then PDQ, then keypoints (the
    /// costliest, so looked at last). A query hash
    /// of quality under 50 is not used, nor are references of such quality.
    pub fn judge<'a>(&'a self, probe: &Probe<'_>, rules: &Rules) -> Verdict<'a> {
        let threshold = self.threshold.unwrap_or(rules.threshold);
        let scored: Vec<(&Reference, f32)> = probe.embedding.map(|q| self.scores(q).collect()).unwrap_or_default();
        let best = scored.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1));
        let by_pdq =
            probe.pdq.filter(|(_, q)| *q >= pdq::MIN_MATCH_QUALITY).and_then(|(hash, _)| self.nearest_pdq(&hash));
        let mut verdict = Verdict {
            signal: None,
            reference: best.map(|b| b.0.id.as_str()).or(by_pdq.map(|p| p.0)),
            score: best.map(|b| b.1),
            distance: by_pdq.map(|p| p.1),
            inliers: None,
            needs_keypoints: false,
        };
        let robust = rules.robust();
        // A score that matches by itself: the threshold, raised to `direct` for references that
        // keypoints can check.
        let direct = |r: &Reference| match robust {
            Some(v) if r.keypoints.is_some() => threshold.max(v.direct),
            _ => threshold,
        };
        let by_embedding = scored.iter().filter(|(r, s)| *s >= direct(r)).max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((r, s)) = by_embedding {
            return Verdict { signal: Some(SignalKind::Embedding), reference: Some(&r.id), score: Some(*s), ..verdict };
        }
        if let Some((r, _)) = by_pdq.filter(|(_, d)| *d <= self.pdq_distance()) {
            return Verdict { signal: Some(SignalKind::Pdq), reference: Some(r), ..verdict };
        }
        if let Some(v) = robust {
            let mut candidates: Vec<_> = scored
                .iter()
                .filter(|(r, s)| *s >= v.floor && r.keypoints.as_ref().is_some_and(|k| !k.is_empty()))
                .collect();
            candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
            candidates.truncate(MAX_CHECKED);
            match (probe.keypoints, candidates.is_empty()) {
                (_, true) => {}
                (None, false) => verdict.needs_keypoints = true,
                (Some(image), false) => {
                    let mut most = 0;
                    for (r, s) in candidates {
                        let agree = r.keypoints.as_ref().map_or(0, |k| keypoints::verify(image, k));
                        most = most.max(agree);
                        if agree >= v.min_inliers {
                            let found = Some(SignalKind::Keypoints);
                            return Verdict {
                                signal: found,
                                reference: Some(&r.id),
                                score: Some(*s),
                                inliers: Some(agree),
                                ..verdict
                            };
                        }
                    }
                    verdict.inliers = Some(most);
                }
            }
        }
        verdict
    }

    /// The usable PDQ reference nearest to the hash: (reference id, Hamming distance).
    fn nearest_pdq(&self, hash: &Pdq) -> Option<(&str, u32)> {
        self.references
            .iter()
            .filter(|r| r.pdq_usable())
            .filter_map(|r| Some((r.id.as_str(), r.pdq.as_ref()?.distance(hash))))
            .min_by_key(|m| m.1)
    }

    /// How many embedding references have no keypoints, so are matched by the global rule even
    /// in the robust mode (re-uploading their images gives them keypoints).
    pub fn without_keypoints(&self) -> usize {
        self.references.iter().filter(|r| !r.embedding.is_empty() && r.keypoints.is_none()).count()
    }
}

#[cfg(test)]
mod tests;
