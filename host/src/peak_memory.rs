//! The process's peak (Linux `VmHWM`) and current (`VmRSS`) resident memory, for the per-job log
//! line: an operator sizing a machine needs the peak, and what a job did not give back. The peak is reset when a
//! job starts alone, so with one job at a time it is that job's; with two it covers both.
//! Host memory only: GPU memory is ORT's arena (not measured here).

/// Starts a new peak from the current resident size; false where the kernel does not allow it.
pub fn reset() -> bool {
    // "5" resets the peak RSS (Linux >= 4.0, `proc(5)` clear_refs).
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident bytes since the process started or the last [`reset`].
pub fn peak_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// Resident bytes now: after a job, what it did not give back.
pub fn resident_bytes() -> Option<u64> {
    status_bytes("VmRSS:")
}

fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_peak_sees_a_large_allocation_and_resets() {
        assert!(super::reset(), "clear_refs is writable for our own process");
        let before = super::peak_bytes().expect("VmHWM");
        let big = vec![1u8; 64 << 20];
        std::hint::black_box(&big);
        // Resident first: other tests' threads allocate too, and the peak read after it can
        // only be higher (the other order failed once in CI, by 12 KiB).
        let resident = super::resident_bytes().expect("VmRSS");
        let during = super::peak_bytes().expect("VmHWM");
        assert!(
            resident >= 60 << 20 && resident <= during,
            "{resident} of {during}"
        );
        drop(big);
        assert!(during >= before + (60 << 20), "{before} → {during}");
        assert!(super::reset());
        assert!(super::peak_bytes().expect("VmHWM") < during);
    }
}
