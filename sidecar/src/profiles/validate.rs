//! Checking the references of a new profile.

use std::collections::HashMap;

use super::{MAX_REFERENCES, ProfileError, Reference, Signal};
use crate::matcher;

/// Checks references and normalises their embeddings; errors name the offending index.
pub(super) fn validate_references<S: Into<Signal>>(
    refs: Vec<(String, S)>,
    dim: usize,
) -> Result<Vec<Reference>, ProfileError> {
    if refs.is_empty() {
        return Err(ProfileError::Invalid("references must not be empty".to_owned()));
    }
    let n = refs.len();
    if n > MAX_REFERENCES {
        return Err(ProfileError::Invalid(format!("references has {n} entries, at most {MAX_REFERENCES} are allowed")));
    }
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(refs.len());
    let mut out = Vec::with_capacity(refs.len());
    for (i, (id, signal)) in refs.into_iter().enumerate() {
        if id.is_empty() {
            return Err(ProfileError::Invalid(format!("references[{i}].id is empty")));
        }
        if let Some(first) = seen.insert(id.clone(), i) {
            return Err(ProfileError::Invalid(format!("references[{i}].id {id:?} repeats references[{first}].id")));
        }
        let (mut embedding, keypoints) = match signal.into() {
            Signal::Embedding(embedding) => (embedding, None),
            Signal::Image(embedding, keypoints) => (embedding, Some(keypoints)),
            Signal::Pdq(_, Some(q)) if q > 100 => {
                return Err(ProfileError::Invalid(format!("references[{i}].quality {q} must be within 0..=100")));
            }
            Signal::Pdq(hash, quality) => {
                out.push(Reference { id, embedding: Vec::new(), pdq: Some(hash), quality, keypoints: None });
                continue;
            }
        };
        if embedding.len() != dim {
            return Err(ProfileError::DimensionMismatch { reference: id, expected: dim, got: embedding.len() });
        }
        if embedding.iter().any(|x| !x.is_finite()) {
            return Err(ProfileError::Invalid(format!("references[{i}].embedding ({id:?}) has a non-finite value")));
        }
        if !matcher::normalize(&mut embedding) {
            return Err(ProfileError::Invalid(format!("references[{i}].embedding ({id:?}) is all zeros")));
        }
        out.push(Reference { id, embedding, pdq: None, quality: None, keypoints });
    }
    Ok(out)
}
