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
    /// Set in the child process that runs the check alone.
    const ALONE: &str = "WANSERVE_PEAK_MEMORY_TEST_ALONE";

    /// The peak is the whole process's, and in this test binary other tests' threads allocate
    /// and free beside it (loading ORT sessions, decoding): a transient peak of theirs can hide
    /// the allocation, or come after the reset. So the check runs in a child process that runs
    /// only this test, on one thread.
    #[test]
    fn the_peak_sees_a_large_allocation_and_resets() {
        if std::env::var_os(ALONE).is_none() {
            let name = "peak_memory::tests::the_peak_sees_a_large_allocation_and_resets";
            let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
                .args([name, "--exact", "--test-threads=1", "--nocapture"])
                .env(ALONE, "1")
                .output()
                .expect("the test binary runs");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{stdout}{stderr}");
            assert!(
                stdout.contains("1 passed"),
                "the check did not run: {stdout}"
            );
            return;
        }
        assert!(super::reset(), "clear_refs is writable for our own process");
        let before = super::peak_bytes().expect("VmHWM");
        let big = vec![1u8; 64 << 20];
        std::hint::black_box(&big);
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
