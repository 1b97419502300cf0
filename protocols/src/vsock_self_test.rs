//! The data contract of `Agent.VsockSelfTest`, shared so the host can check what the guest sent.
//!
//! The agent sends the first `send_bytes` bytes of the stream produced by [`Pattern`]: a
//! xorshift64* generator seeded with [`PATTERN_SEED`], each 64-bit output written little-endian.
//! The stream does not depend on how it is cut into chunks.

/// Largest `VsockSelfTestRequest.send_bytes` the agent accepts (64 MiB).
pub const MAX_SEND_BYTES: u64 = 64 * 1024 * 1024;

/// Seed of the self-test pattern ("brigvsoc" in ASCII). Never zero (xorshift would stay zero).
pub const PATTERN_SEED: u64 = 0x6272_6967_7673_6f63;

/// Multiplier of xorshift64* (Vigna).
const XORSHIFT64_STAR_MULTIPLIER: u64 = 0x2545_f491_4f6c_dd1d;

/// Deterministic pseudo-random byte stream used by the vsock self-test.
///
/// ```
/// use brig_protocols::vsock_self_test::Pattern;
///
/// let mut whole = [0u8; 20];
/// Pattern::new().fill(&mut whole);
///
/// // Cutting the stream differently gives the same bytes.
/// let mut pattern = Pattern::new();
/// let (mut a, mut b) = ([0u8; 3], [0u8; 17]);
/// pattern.fill(&mut a);
/// pattern.fill(&mut b);
/// assert_eq!(&whole[..3], &a);
/// assert_eq!(&whole[3..], &b);
/// ```
#[derive(Debug, Clone)]
pub struct Pattern {
    state: u64,
    /// The current 64-bit word, little-endian, of which `word[used..]` is not yet emitted.
    word: [u8; 8],
    used: usize,
}

impl Default for Pattern {
    fn default() -> Self {
        Self::new()
    }
}

impl Pattern {
    /// A generator at the start of the stream.
    pub fn new() -> Self {
        Self {
            state: PATTERN_SEED,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(XORSHIFT64_STAR_MULTIPLIER).to_le_bytes()
    }

    /// Writes the next `out.len()` bytes of the stream into `out`.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut out = out;
        // Finish the partly emitted word first.
        if self.used < 8 {
            let n = out.len().min(8 - self.used);
            let (head, rest) = out.split_at_mut(n);
            head.copy_from_slice(&self.word[self.used..self.used + n]);
            self.used += n;
            out = rest;
        }
        let mut chunks = out.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_word());
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            self.word = self.next_word();
            tail.copy_from_slice(&self.word[..tail.len()]);
            self.used = tail.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_independent_of_chunking() {
        let mut whole = vec![0u8; 1000];
        Pattern::new().fill(&mut whole);
        for step in [1usize, 3, 7, 8, 9, 64, 999] {
            let mut pattern = Pattern::new();
            let mut pieces = Vec::new();
            while pieces.len() < whole.len() {
                let mut buf = vec![0u8; step.min(whole.len() - pieces.len())];
                pattern.fill(&mut buf);
                pieces.extend_from_slice(&buf);
            }
            assert_eq!(pieces, whole, "chunk size {step}");
        }
    }

    #[test]
    fn stream_is_stable_and_not_trivial() {
        let mut first = [0u8; 16];
        Pattern::new().fill(&mut first);
        let mut again = [0u8; 16];
        Pattern::new().fill(&mut again);
        assert_eq!(first, again);
        assert_ne!(first[..8], first[8..]);
        assert!(first.iter().any(|&b| b != 0));
    }

    #[test]
    fn empty_fill_does_not_advance() {
        let mut pattern = Pattern::new();
        pattern.fill(&mut []);
        let mut a = [0u8; 8];
        pattern.fill(&mut a);
        let mut b = [0u8; 8];
        Pattern::new().fill(&mut b);
        assert_eq!(a, b);
    }
}
