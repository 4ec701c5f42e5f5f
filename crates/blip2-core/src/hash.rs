//! FNV-1a (64 bits): a stable hash for names on disk (cache folders, checkpoint
//! fingerprints). std's hasher may change between Rust releases; this never does.

/// An FNV-1a state.
#[derive(Debug, Clone, Copy)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    /// Hashes `bytes` as they are.
    pub fn write(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    /// Hashes `bytes` after their length, so that concatenations of fields cannot
    /// collide ("ab" + "c" and "a" + "bc" differ).
    pub fn write_field(&mut self, bytes: &[u8]) -> &mut Self {
        self.write(&(bytes.len() as u64).to_le_bytes()).write(bytes)
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// FNV-1a of `bytes`.
pub fn fnv64(bytes: &[u8]) -> u64 {
    Fnv64::default().write(bytes).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_values_and_fields() {
        // The published FNV-1a 64 test vectors.
        assert_eq!(fnv64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv64(b"foobar"), 0x8594_4171_f739_67e8);
        let field = |parts: &[&[u8]]| {
            let mut h = Fnv64::default();
            for p in parts {
                h.write_field(p);
            }
            h.finish()
        };
        assert_ne!(field(&[b"ab", b"c"]), field(&[b"a", b"bc"]));
    }
}
