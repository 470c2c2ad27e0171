//! The cached value: an embedding in a compact, self-checking byte form.
//!
//! The same bytes go to disk and to Redis, where they may be torn, flipped or written by another
//! build, so a value carries its element type, its length and a checksum, and decoding refuses
//! anything that does not add up. f16 halves the size at a cost of about 1e-3 relative error per
//! element, far below what changes a match; f32 keeps cached answers bit-identical to computed ones.

use std::str::FromStr;

/// Marks a value and its format version.
const MAGIC: [u8; 4] = *b"IPE\x01";
/// magic, encoding, 3 reserved bytes, dimension (u32 LE).
const HEADER: usize = 12;
/// Bytes of blake3 kept as the checksum.
const CHECKSUM: usize = 8;

/// How embedding values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Little-endian f32: exact.
    F32,
    /// Little-endian IEEE half precision: half the bytes.
    F16,
}

impl Encoding {
    fn tag(self) -> u8 {
        match self {
            Encoding::F32 => 0,
            Encoding::F16 => 1,
        }
    }

    fn width(self) -> usize {
        match self {
            Encoding::F32 => 4,
            Encoding::F16 => 2,
        }
    }
}

impl FromStr for Encoding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Encoding::F32),
            "f16" => Ok(Encoding::F16),
            other => Err(format!("{other:?}: expected f32 or f16")),
        }
    }
}

/// Why stored bytes are not a usable embedding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Shorter than a header and a checksum.
    #[error("value too short ({0} bytes)")]
    Short(usize),
    /// Not a value of this format or version.
    #[error("unknown value format")]
    Magic,
    /// An element type this build does not know.
    #[error("unknown element encoding {0}")]
    Encoding(u8),
    /// The length does not match the dimension.
    #[error("value holds {got} bytes, its header says {want}")]
    Length {
        /// Bytes present.
        got: usize,
        /// Bytes the header implies.
        want: usize,
    },
    /// The checksum does not match.
    #[error("checksum mismatch")]
    Checksum,
    /// The dimension is not the model's.
    #[error("embedding has {got} values, the model's have {want}")]
    Dimension {
        /// Values present.
        got: usize,
        /// The model's dimension.
        want: usize,
    },
}

fn checksum(header: &[u8], payload: &[u8]) -> [u8; CHECKSUM] {
    let mut h = blake3::Hasher::new();
    h.update(header);
    h.update(payload);
    let mut out = [0; CHECKSUM];
    out.copy_from_slice(&h.finalize().as_bytes()[..CHECKSUM]);
    out
}

/// Encodes `values` for storage.
pub fn encode(values: &[f32], encoding: Encoding) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + CHECKSUM + values.len() * encoding.width());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[encoding.tag(), 0, 0, 0]);
    out.extend_from_slice(&(values.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; CHECKSUM]);
    match encoding {
        Encoding::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Encoding::F16 => values.iter().for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
    }
    let sum = checksum(&out[..HEADER], &out[HEADER + CHECKSUM..]);
    out[HEADER..HEADER + CHECKSUM].copy_from_slice(&sum);
    out
}

/// Decodes and checks a stored value; `dim` is the model's embedding dimension.
pub fn decode(bytes: &[u8], dim: usize) -> Result<Vec<f32>, CodecError> {
    if bytes.len() < HEADER + CHECKSUM {
        return Err(CodecError::Short(bytes.len()));
    }
    if bytes[..4] != MAGIC {
        return Err(CodecError::Magic);
    }
    let encoding = match bytes[4] {
        0 => Encoding::F32,
        1 => Encoding::F16,
        other => return Err(CodecError::Encoding(other)),
    };
    let n = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    let payload = &bytes[HEADER + CHECKSUM..];
    let want = n.saturating_mul(encoding.width());
    if payload.len() != want {
        return Err(CodecError::Length { got: payload.len(), want });
    }
    if checksum(&bytes[..HEADER], payload) != bytes[HEADER..HEADER + CHECKSUM] {
        return Err(CodecError::Checksum);
    }
    if n != dim {
        return Err(CodecError::Dimension { got: n, want: dim });
    }
    Ok(match encoding {
        Encoding::F32 => payload.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Encoding::F16 => payload.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<f32> {
        (0..1280).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect()
    }

    #[test]
    fn f32_round_trips_exactly() {
        let v = sample();
        let bytes = encode(&v, Encoding::F32);
        assert_eq!(bytes.len(), HEADER + CHECKSUM + 1280 * 4);
        assert_eq!(decode(&bytes, 1280).unwrap(), v);
    }

    #[test]
    fn f16_is_half_the_size_and_close() {
        let v = sample();
        let bytes = encode(&v, Encoding::F16);
        assert_eq!(bytes.len(), HEADER + CHECKSUM + 1280 * 2);
        let back = decode(&bytes, 1280).unwrap();
        for (a, b) in v.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() * 1e-3 + 1e-4, "{a} vs {b}");
        }
    }

    #[test]
    fn damaged_values_are_refused() {
        let good = encode(&sample(), Encoding::F32);
        let flip = |i: usize| {
            let mut b = good.clone();
            b[i] ^= 0x40;
            b
        };
        let cases: Vec<(&str, Vec<u8>, CodecError)> = vec![
            ("empty", vec![], CodecError::Short(0)),
            ("header only", good[..HEADER].to_vec(), CodecError::Short(HEADER)),
            ("magic", flip(0), CodecError::Magic),
            ("encoding", flip(4), CodecError::Encoding(0x40)),
            ("truncated", good[..good.len() - 1].to_vec(), CodecError::Length { got: 5119, want: 5120 }),
            ("extended", [good.as_slice(), &[0]].concat(), CodecError::Length { got: 5121, want: 5120 }),
            ("reserved byte", flip(5), CodecError::Checksum),
            ("checksum", flip(HEADER), CodecError::Checksum),
            ("payload", flip(good.len() - 3), CodecError::Checksum),
        ];
        for (name, bytes, want) in cases {
            assert_eq!(decode(&bytes, 1280).unwrap_err(), want, "{name}");
        }
        assert_eq!(decode(&good, 512).unwrap_err(), CodecError::Dimension { got: 1280, want: 512 });
    }
}
