//! Seeded Gaussian noise that reproduces
//! `torch.randn(shape, generator=torch.Generator().manual_seed(seed))` (float32, CPU),
//! so one seed means the same video in wanserve and in diffusers.
//!
//! torch's CPU generator is the standard 32-bit Mersenne Twister. `normal_fill` draws *all* the
//! uniforms first, then turns them into normals 16 at a time with Box–Muller; when the count is
//! not a multiple of 16, it draws 16 fresh uniforms and recomputes the last 16 values from them.
//! torch's AVX2 path does the trigonometry in vectorised float32, so the last bit may differ
//! (measured ≤ 5e-7); this implementation uses f64 trigonometry and rounds once.

const N: usize = 624;
const M: usize = 397;

/// MT19937 exactly as `std::mt19937` / `at::mt19937` (seeded with the low 32 bits of the seed).
pub struct Mt19937 {
    state: [u32; N],
    index: usize,
}

impl Mt19937 {
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = seed as u32;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, index: N }
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7fff_ffff);
            let mut next = self.state[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// torch's `uniform_real_distribution<float>(0, 1)`: 24 random bits scaled to [0, 1).
    fn next_uniform_f32(&mut self) -> f32 {
        (self.next_u32() & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32)
    }
}

fn box_muller_16(block: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0f32 - block[j];
        let u2 = block[j + 8];
        let radius = (-2.0 * f64::from(u1).ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * f64::from(u2);
        block[j] = (radius * theta.cos()) as f32;
        block[j + 8] = (radius * theta.sin()) as f32;
    }
}

/// `count` standard normal values as torch draws them for a fresh generator seeded with `seed`.
///
/// torch takes a different (scalar, one-at-a-time) path below 16 values; latents are always far
/// larger, so that path is not reproduced and smaller counts are refused.
pub fn torch_randn(seed: u64, count: usize) -> Result<Vec<f32>, NoiseError> {
    if count < 16 {
        return Err(NoiseError::TooFew(count));
    }
    let mut rng = Mt19937::new(seed);
    let mut values: Vec<f32> = (0..count).map(|_| rng.next_uniform_f32()).collect();
    for block in values.chunks_exact_mut(16) {
        box_muller_16(block);
    }
    if !count.is_multiple_of(16) {
        let tail = &mut values[count - 16..];
        for v in tail.iter_mut() {
            *v = rng.next_uniform_f32();
        }
        box_muller_16(tail);
    }
    Ok(values)
}

#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    #[error("seeded noise needs at least 16 values, got {0}")]
    TooFew(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_cpp_standard() {
        // The C++ standard fixes the 10000th output of a default-seeded (5489) mt19937.
        let mut rng = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = rng.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn torch_randn_seed_0_matches_torch() {
        // torch.randn(16, generator=torch.Generator().manual_seed(0)), printed by torch 2.15.
        let expected = [
            -1.125_839_8_f32,
            -1.152_360_2,
            -0.250_578_58,
            -0.433_878_8,
            0.848_710_36,
            0.692_009_15,
            -0.316_012_77,
            -2.115_219_4,
            0.322_274_92,
            -1.263_334_8,
            0.349_983_2,
            0.308_133_93,
            0.119_841_51,
            1.237_657_9,
            1.116_777_2,
            -0.247_278_15,
        ];
        let got = torch_randn(0, 16).unwrap();
        for (g, e) in got.iter().zip(expected) {
            assert!((g - e).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn torch_randn_recomputes_the_tail_like_torch() {
        // torch.randn(1_000_003, generator=torch.Generator().manual_seed(2**31 - 1)): a count that
        // is not a multiple of 16, so the last 16 values come from fresh draws.
        let got = torch_randn(2_147_483_647, 1_000_003).unwrap();
        for (index, expected) in [
            (0, 1.567_362_f32),
            (999_986, 1.051_918_1),
            (1_000_002, 1.053_179_4),
        ] {
            assert!(
                (got[index] - expected).abs() < 1e-6,
                "value {index}: {}",
                got[index]
            );
        }
    }

    #[test]
    fn refuses_fewer_than_16() {
        assert!(torch_randn(1, 15).is_err());
    }
}
