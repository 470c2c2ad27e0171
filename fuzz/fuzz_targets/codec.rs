//! Any bytes as a cached embedding (the value format of the disk and Redis tiers): decoding must
//! refuse or return exactly the dimension asked for, and what decodes re-encodes to a value that
//! decodes to the same numbers.
#![no_main]

use inferpool_sidecar::cache::codec::{Encoding, decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for dim in [1usize, 4, 1280] {
        let Ok(values) = decode(data, dim) else { continue };
        assert_eq!(values.len(), dim);
        let again = decode(&encode(&values, Encoding::F32), dim).expect("a re-encoded value decodes");
        let same = values.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
        assert!(same, "f32 round trip changed the values");
    }
});
