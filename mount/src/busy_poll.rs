//! Busy-polling of `/dev/fuse` for a moment after each request answered at once.
//!
//! Why: a FUSE operation is a round trip between the application's thread and ours. When
//! our thread sleeps in `read(/dev/fuse)`, every request must wake it, and on a virtual
//! machine whose idle vCPUs halt (this project's test machines poll 0 ns before halting)
//! that wake-up is an inter-processor interrupt and a VM exit: measured on a create loop,
//! two thirds of the FUSE thread's time went to being woken and waking others, not to work.
//! Spinning on a non-blocking `/dev/fuse` for [`MountOptions::busy_poll`] after a request
//! takes the request as soon as it is queued: a create loop ran about twice as fast.
//!
//! How, without a hook in fuser's read loop: the device's file description is switched to
//! `O_NONBLOCK` (fuser's loop retries `EAGAIN` at once, which is the spin) when a request
//! is answered on the FUSE thread within the window of the one before, and back to
//! blocking by a small thread of ours once no request came for the window, or at once when
//! a request had to wait for the network (the reply then comes from a runtime thread, and
//! the CPU is better left to that work than burnt here). An idle mount therefore costs
//! only the small thread's check once a second, and a lone request now and then starts no
//! polling; a busy mount costs at most one core while requests keep coming.
//!
//! [`MountOptions::busy_poll`]: crate::MountOptions::busy_poll

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tracing::warn;

/// `BusyPoll::last_us` before the first request.
const NEVER: u64 = u64::MAX;

/// The busy-poll switch of one mount's `/dev/fuse`.
pub(crate) struct BusyPoll {
    /// A duplicate of the session's descriptor: same file description, so its flags are the
    /// session's.
    fd: OwnedFd,
    window: Duration,
    born: Instant,
    /// Microseconds after `born` of the last request answered at once.
    last_us: AtomicU64,
    /// Whether the descriptor is non-blocking; read without the lock on every request.
    spinning: AtomicBool,
    /// Requests whose reply a runtime thread will send: no polling while there are any.
    waiting: AtomicUsize,
    /// Serializes the flag changes; the cooler thread waits on `armed` while not spinning.
    state: Mutex<()>,
    armed: Condvar,
}

impl BusyPoll {
    /// Busy-polling of `fd` for `window` after each request; `None` when `window` is zero
    /// or the descriptor cannot be duplicated (the mount then simply sleeps in `read`).
    pub(crate) fn start(fd: &OwnedFd, window: Duration) -> Option<Arc<BusyPoll>> {
        if window.is_zero() {
            return None;
        }
        let fd = match fd.try_clone() {
            Ok(fd) => fd,
            Err(e) => {
                warn!(error = %e, "cannot duplicate /dev/fuse; busy-polling is off");
                return None;
            }
        };
        let me = Arc::new(BusyPoll {
            fd,
            window,
            born: Instant::now(),
            last_us: AtomicU64::new(NEVER),
            spinning: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            state: Mutex::new(()),
            armed: Condvar::new(),
        });
        let cooler = me.clone();
        // The cooler holds the last reference once the session is gone; it then ends.
        let spawned = std::thread::Builder::new()
            .name("fuse-busy-poll".into())
            .spawn(move || cooler.cool());
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the busy-poll thread; busy-polling is off");
            return None;
        }
        Some(me)
    }

    fn window_us(&self) -> u64 {
        u64::try_from(self.window.as_micros()).unwrap_or(u64::MAX)
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// A request was answered on the FUSE thread: poll for the next one if requests come
    /// in quick succession (this one within the window of the last), unless others are
    /// still waiting. A lone request now and then costs no polling.
    pub(crate) fn answered(&self) {
        let now = self.now_us();
        let last = self.last_us.swap(now, Ordering::Relaxed);
        if self.spinning.load(Ordering::Relaxed)
            || self.waiting.load(Ordering::Relaxed) > 0
            || last == NEVER
            || now.saturating_sub(last) > self.window_us()
        {
            return;
        }
        let _state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !self.spinning.load(Ordering::Relaxed) && self.set_nonblocking(true) {
            self.spinning.store(true, Ordering::Relaxed);
            self.armed.notify_one();
        }
    }

    /// A request has to wait (its reply will come from another thread): no polling until
    /// the returned guard is dropped with its task (answered, failed or cancelled alike).
    pub(crate) fn waits(self: &Arc<Self>) -> Waiting {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        if self.spinning.load(Ordering::Relaxed) {
            self.stop();
        }
        Waiting(self.clone())
    }

    fn stop(&self) {
        let _state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.spinning.load(Ordering::Relaxed) {
            self.set_nonblocking(false);
            self.spinning.store(false, Ordering::Relaxed);
        }
    }

    fn set_nonblocking(&self, on: bool) -> bool {
        // nix 0.29's fcntl takes a raw descriptor; `self.fd` outlives the calls.
        let fd = self.fd.as_raw_fd();
        let flags = fcntl(fd, FcntlArg::F_GETFL).map(OFlag::from_bits_truncate);
        let set = flags.and_then(|mut f| {
            f.set(OFlag::O_NONBLOCK, on);
            fcntl(fd, FcntlArg::F_SETFL(f))
        });
        match set {
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, "cannot change /dev/fuse's O_NONBLOCK");
                false
            }
        }
    }

    /// The cooler thread: back to a blocking read once no request came for the window.
    fn cool(self: Arc<Self>) {
        let window_us = self.window_us();
        loop {
            {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                while !self.spinning.load(Ordering::Relaxed) {
                    if Arc::strong_count(&self) == 1 {
                        return;
                    }
                    // Bounded, so that a session that ended is noticed.
                    state = self
                        .armed
                        .wait_timeout(state, Duration::from_secs(1))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            loop {
                let idle = self
                    .now_us()
                    .saturating_sub(self.last_us.load(Ordering::Relaxed));
                if idle >= window_us {
                    self.stop();
                    break;
                }
                std::thread::sleep(Duration::from_micros(window_us - idle));
                if !self.spinning.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
    }
}

/// A request whose reply a runtime thread will send (see [`BusyPoll::waits`]).
pub(crate) struct Waiting(Arc<BusyPoll>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nonblocking(fd: &OwnedFd) -> bool {
        let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).unwrap();
        OFlag::from_bits_truncate(flags).contains(OFlag::O_NONBLOCK)
    }

    /// Waits up to 5 s for the descriptor's flag to become `want`.
    fn settles(fd: &OwnedFd, want: bool) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if nonblocking(fd) == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn polls_while_requests_come_quickly_and_stops_when_they_stop_or_wait() {
        let (rx, _tx) = nix::unistd::pipe().unwrap();
        let busy = BusyPoll::start(&rx, Duration::from_millis(200)).unwrap();
        // A lone request does not start polling; a second one soon after does.
        busy.answered();
        assert!(!nonblocking(&rx));
        busy.answered();
        assert!(nonblocking(&rx));
        // No request for the window: back to blocking.
        assert!(settles(&rx, false), "still polling after the window");
        // A request that waits stops the polling at once, and none starts until it is
        // answered.
        busy.answered();
        busy.answered();
        assert!(nonblocking(&rx));
        let waiting = busy.waits();
        assert!(!nonblocking(&rx));
        busy.answered();
        assert!(!nonblocking(&rx));
        drop(waiting);
        busy.answered();
        assert!(nonblocking(&rx));
        assert!(settles(&rx, false));
    }

    #[test]
    fn a_zero_window_is_off() {
        let (rx, _tx) = nix::unistd::pipe().unwrap();
        assert!(BusyPoll::start(&rx, Duration::ZERO).is_none());
    }
}
