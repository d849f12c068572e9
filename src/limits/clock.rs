//! The limits' clock: nanoseconds since the limits were made, read two ways.
//!
//! Every small download is admitted with a clock read, and a precise one
//! (`Instant::now`, a vDSO `clock_gettime` that reads the TSC) is about 24 ns
//! here, about a tenth of what the limits added to a 4 KiB request. Admission does
//! not need that precision: what it decides from the time is whether a
//! bucket has room and when an agent was last seen. So it reads the kernel's
//! coarse clock (`CLOCK_MONOTONIC_COARSE`, about 3 ns), which is the same
//! clock as `Instant` but only advances once a tick (1 to 10 ms, with the
//! kernel's `CONFIG_HZ`; 4 ms on most distributions). Pacing a
//! stream, where the waits are computed, reads the precise one.
//!
//! What a coarse read costs in accuracy: a reservation made with it starts up
//! to one tick in the past, so an agent idle for a while may get one tick's
//! worth of its rate on top of its burst; an agent that is busy sees its
//! bucket up to a tick fuller than it is, and is paced a little sooner. Both
//! are bounded by one tick, whatever the traffic.

#[cfg(not(target_os = "linux"))]
use std::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    #[cfg(target_os = "linux")]
    epoch_ns: u64,
    #[cfg(not(target_os = "linux"))]
    epoch: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    pub fn new() -> Clock {
        #[cfg(target_os = "linux")]
        return Clock { epoch_ns: read(rustix::time::ClockId::Monotonic) };
        #[cfg(not(target_os = "linux"))]
        return Clock { epoch: Instant::now() };
    }

    /// Now, to the nanosecond.
    pub fn now(&self) -> u64 {
        #[cfg(target_os = "linux")]
        return read(rustix::time::ClockId::Monotonic).saturating_sub(self.epoch_ns);
        #[cfg(not(target_os = "linux"))]
        return u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
    }

    /// Now, up to one tick behind (see the module's comment), never ahead of
    /// [`Clock::now`]. (Old kernels could step it back by nanoseconds after an
    /// NTP adjustment: every use saturates, so that costs nothing.)
    pub fn coarse(&self) -> u64 {
        #[cfg(target_os = "linux")]
        return read(rustix::time::ClockId::MonotonicCoarse).saturating_sub(self.epoch_ns);
        #[cfg(not(target_os = "linux"))]
        return self.now();
    }
}

#[cfg(target_os = "linux")]
fn read(id: rustix::time::ClockId) -> u64 {
    let t = rustix::time::clock_gettime(id);
    // Monotonic clocks count from boot: never negative.
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_trails_precise_by_at_most_a_tick() {
        let c = Clock::new();
        let mut least = u64::MAX;
        for _ in 0..1000 {
            let coarse = c.coarse();
            let precise = c.now();
            assert!(coarse <= precise, "{coarse} > {precise}");
            least = least.min(precise - coarse);
        }
        // A tick is at most 10 ms (HZ=100). The least gap, not every gap: the
        // thread may be descheduled between two reads.
        assert!(least < 10_000_000, "coarse trails precise by {least} ns");
        // The same clock as Instant: 20 ms on one are 20 ms on the other.
        let a = c.now();
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(20) {
            std::hint::spin_loop();
        }
        let moved = c.now() - a;
        assert!((20_000_000..20_000_000_000).contains(&moved), "20 ms took {moved} ns");
        assert!(c.coarse() >= a, "coarse is not behind by a tick after 20 ms");
    }

    /// The coarse clock is the kernel's tick clock, not the precise one under
    /// another name: it moves in steps, far fewer than the reads of it (a
    /// tick is 1 ms or more; a tickless kernel also updates it when a CPU
    /// wakes, so single steps can be short, but not hundreds in 50 ms).
    #[cfg(target_os = "linux")]
    #[test]
    fn coarse_moves_in_ticks() {
        let c = Clock::new();
        let (t, mut last, mut steps, mut reads) = (std::time::Instant::now(), c.coarse(), 0u64, 0u64);
        let mut done = false;
        while !done {
            // One last read after 50 ms, however the thread was scheduled.
            done = t.elapsed() >= std::time::Duration::from_millis(50);
            let now = c.coarse();
            reads += 1;
            if now != last {
                steps += 1;
                last = now;
            }
        }
        assert!(steps > 0, "the coarse clock did not move in 50 ms");
        assert!(steps <= 500 && steps * 100 < reads, "{steps} steps in {reads} reads over 50 ms: not a tick clock");
    }
}
