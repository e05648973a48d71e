//! Denoising steps taken in rotation across jobs.

/// One denoising step at a time across jobs, in rotation: each job in its denoising loop is a
/// member, holds the turn for a whole step (both guidance passes and the update) and then goes to
/// the back. So with two jobs denoising their steps alternate and neither gets more than one step
/// ahead, even when the other job's thread has not been run by the OS since its last step (a
/// fair mutex alone hands over only to a job already waiting).
/// A member that does not come for its turn within [`StepTurns::PATIENCE`] (its caller's progress
/// callback stuck on a slow store, say) is passed over once, so that no job waits on another's
/// stall. A member leaves when its loop ends, fails or is cancelled.
#[derive(Default)]
pub(super) struct StepTurns {
    rotation: parking_lot::Mutex<Rotation>,
    changed: parking_lot::Condvar,
}

#[derive(Default)]
struct Rotation {
    next_member: u64,
    /// Members in turn order; the one holding the turn is at the front.
    order: std::collections::VecDeque<u64>,
    held: bool,
}

/// A job's place in the rotation, for the length of its denoising loop.
pub(super) struct Member<'a> {
    turns: &'a StepTurns,
    id: u64,
}

/// The turn, held for one step.
pub(super) struct Turn<'a>(&'a Member<'a>);

impl StepTurns {
    /// How long the member whose turn it is may take to come for it before the next is served.
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

    pub(super) fn join(&self) -> Member<'_> {
        let mut rotation = self.rotation.lock();
        let id = rotation.next_member;
        rotation.next_member += 1;
        rotation.order.push_back(id);
        Member { turns: self, id }
    }
}

impl Member<'_> {
    pub(super) fn take(&self) -> Turn<'_> {
        let turns = self.turns;
        let mut rotation = turns.rotation.lock();
        loop {
            if !rotation.held && rotation.order.front() == Some(&self.id) {
                rotation.held = true;
                return Turn(self);
            }
            let timed_out = turns
                .changed
                .wait_for(&mut rotation, StepTurns::PATIENCE)
                .timed_out();
            if timed_out && !rotation.held && rotation.order.front() != Some(&self.id) {
                // Whoever is first has not come for its turn: this member goes first, and the
                // absent one keeps its place right after it.
                rotation.order.retain(|&m| m != self.id);
                rotation.order.push_front(self.id);
            }
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let Member { turns, id } = *self.0;
        let mut rotation = turns.rotation.lock();
        rotation.held = false;
        rotation.order.retain(|&m| m != id);
        rotation.order.push_back(id);
        drop(rotation);
        turns.changed.notify_all();
    }
}

impl Drop for Member<'_> {
    fn drop(&mut self) {
        self.turns.rotation.lock().order.retain(|&m| m != self.id);
        self.turns.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::StepTurns;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// A job that ends its step while another waits cannot start its next step first, however
    /// quickly it asks again.
    #[test]
    fn a_waiting_job_gets_the_turn_before_the_job_that_just_released_it() {
        let turns = StepTurns::default();
        let (releaser, waiter) = (turns.join(), turns.join());
        let order = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            let first = releaser.take();
            let waiting = s.spawn(|| {
                let _turn = waiter.take();
                order.lock().unwrap().push("waiter");
            });
            // Let the waiter block on the turn.
            std::thread::sleep(Duration::from_millis(100));
            drop(first);
            let again = releaser.take();
            order.lock().unwrap().push("releaser again");
            drop(again);
            waiting.join().unwrap();
        });
        assert_eq!(order.into_inner().unwrap(), ["waiter", "releaser again"]);
    }

    /// The case a fair mutex gets wrong: the other job has not asked yet (its thread not run
    /// since its last step), and still the job that just had its step waits for it.
    #[test]
    fn a_job_that_has_not_asked_yet_still_gets_the_next_turn() {
        let turns = StepTurns::default();
        let (fast, slow) = (turns.join(), turns.join());
        let order = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            drop(fast.take());
            let late = s.spawn(|| {
                std::thread::sleep(Duration::from_millis(200));
                let _turn = slow.take();
                order.lock().unwrap().push("slow");
            });
            let _again = fast.take();
            order.lock().unwrap().push("fast again");
            drop(_again);
            late.join().unwrap();
        });
        assert_eq!(order.into_inner().unwrap(), ["slow", "fast again"]);
    }

    /// A member that does not come for its turn holds the others up for PATIENCE at most, and
    /// one that has left holds no one up.
    #[test]
    fn an_absent_member_is_passed_over_and_one_that_left_is_gone() {
        let turns = StepTurns::default();
        let (present, absent) = (turns.join(), turns.join());
        drop(present.take());
        let started = Instant::now();
        drop(present.take());
        let waited = started.elapsed();
        assert!(
            waited >= StepTurns::PATIENCE - Duration::from_millis(50)
                && waited < StepTurns::PATIENCE * 5,
            "waited {waited:?}"
        );
        drop(absent);
        let started = Instant::now();
        for _ in 0..3 {
            drop(present.take());
        }
        assert!(started.elapsed() < Duration::from_millis(100));
    }
}
