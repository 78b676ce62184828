//! eXpServer's `xps_loop` (renamed: `loop` is a Rust keyword): an epoll
//! instance, through mio, with create / attach / detach / run.
//!
//! | C tutorial            | here                          |
//! |-----------------------|-------------------------------|
//! | `xps_loop_create()`   | [`EventLoop::create`]         |
//! | `xps_loop_attach()`   | [`LoopHandle::attach`]        |
//! | `xps_loop_detach()`   | [`LoopHandle::detach`]        |
//! | `xps_loop_run()`      | [`EventLoop::run`]            |
//!
//! The loop knows nothing about listeners or connections: it waits, hands
//! each event to a [`Handler`], and asks it how long it may sleep next. Each
//! registration carries a [`Token`] the owner chose (O(1) dispatch instead
//! of the tutorial's scan of its lists), and mio registers edge-triggered:
//! handlers read until `WouldBlock` (`docs/c-to-rust.md`, differences 1–2).

use std::io;
use std::time::Duration;

use mio::event::{Event, Source};
use mio::{Events, Interest, Poll, Registry, Token, Waker};

/// Events fetched per `epoll_wait` (the tutorial's `MAX_EPOLL_EVENTS` is 32;
/// more per call means fewer calls under load).
pub const MAX_EVENTS: usize = 1024;

/// What the loop drives: the core implements this.
pub trait Handler {
    /// Called once each time `epoll_wait` returns, before its events: the
    /// moment to read the clock, so that everything handled in this turn is
    /// stamped with the time of the wake-up, not a time read before the
    /// loop slept.
    fn woke(&mut self);
    /// One readiness event.
    fn on_event(&mut self, event: &Event);
    /// Called after every wait (events or not): run timers and deferred work,
    /// and return how long the next wait may block (`None` = until an event).
    fn after_events(&mut self) -> Option<Duration>;
    /// Whether [`EventLoop::run`] should return.
    fn should_stop(&self) -> bool;
}

/// The epoll instance and its event buffer.
pub struct EventLoop {
    /// The mio poller (one epoll fd).
    poll: Poll,
    /// Reused buffer that `epoll_wait` fills.
    events: Events,
}

/// What handlers use to attach and detach sockets while the loop runs: a
/// clone of the poller's registry (it shares the same epoll fd).
pub struct LoopHandle {
    registry: Registry,
}

impl EventLoop {
    /// `xps_loop_create()`: a new epoll instance.
    pub fn create() -> io::Result<EventLoop> {
        Ok(EventLoop {
            poll: Poll::new()?,
            events: Events::with_capacity(MAX_EVENTS),
        })
    }

    /// A handle to attach and detach sockets with.
    pub fn handle(&self) -> io::Result<LoopHandle> {
        Ok(LoopHandle {
            registry: self.poll.registry().try_clone()?,
        })
    }

    /// A waker that makes a blocked [`EventLoop::run`] deliver an event with
    /// `token` (used to tell a worker to shut down from another thread).
    pub fn waker(&self, token: Token) -> io::Result<Waker> {
        Waker::new(self.poll.registry(), token)
    }

    /// `xps_loop_run()`: waits for events and dispatches them until the
    /// handler says stop. `EINTR` is not an error; any other wait error is
    /// returned (it means the epoll fd itself is broken).
    pub fn run<H: Handler>(&mut self, handler: &mut H) -> io::Result<()> {
        let mut timeout = handler.after_events();
        while !handler.should_stop() {
            match self.poll.poll(&mut self.events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            handler.woke();
            for event in self.events.iter() {
                handler.on_event(event);
            }
            timeout = handler.after_events();
        }
        Ok(())
    }
}

impl LoopHandle {
    /// `xps_loop_attach()`: watch `source` for `interest`, edge-triggered,
    /// reporting `token`.
    pub fn attach<S: Source + ?Sized>(
        &self,
        source: &mut S,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        self.registry.register(source, token, interest)
    }

    /// `xps_loop_detach()`: stop watching `source`. xps never needs it in
    /// Stage 6 — closing a socket (dropping it) detaches it, and a paused
    /// listener stays attached and is simply not accepted from — but it is
    /// the tutorial's counterpart and the way to stop watching a socket that
    /// must stay open.
    pub fn detach<S: Source + ?Sized>(&self, source: &mut S) -> io::Result<()> {
        self.registry.deregister(source)
    }
}

/// A one-shot timer the loop can wait on like a socket: a Linux `timerfd`
/// registered in the epoll set.
///
/// Why not just pass a timeout to `epoll_wait`? Because every wait that
/// sleeps with a finite timeout arms and cancels a kernel high-resolution
/// timer, and on a virtual machine programming that timer is a trap to the
/// hypervisor. The idle-timeout deadline is almost always minutes away, so
/// paying for it on every wait was measurable (about a tenth of the server's
/// CPU per line in `lines C=64 P=16`). A timerfd is re-armed only when the
/// earliest deadline changes, and the loop otherwise waits with no timeout.
pub struct LoopTimer {
    /// The timerfd (CLOCK_MONOTONIC, non-blocking, close-on-exec).
    fd: std::os::fd::OwnedFd,
    /// The deadline it is armed for, if any.
    armed: Option<std::time::Instant>,
}

impl LoopTimer {
    /// Creates the timer and attaches it to the loop behind `handle`.
    pub fn create(handle: &LoopHandle, token: Token) -> io::Result<LoopTimer> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: plain syscall; a non-negative result is a new fd we own.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a valid fd that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        handle.attach(
            &mut mio::unix::SourceFd(&fd.as_raw_fd()),
            token,
            Interest::READABLE,
        )?;
        Ok(LoopTimer { fd, armed: None })
    }

    /// Makes the timer fire at `deadline` (CLOCK_MONOTONIC, like `Instant`),
    /// unless it is already armed for exactly that. `now` is the loop's clock.
    pub fn arm_at(
        &mut self,
        deadline: std::time::Instant,
        now: std::time::Instant,
    ) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        if self.armed == Some(deadline) {
            return Ok(());
        }
        // A zero it_value would disarm: fire in 1 ns instead.
        let after = deadline
            .saturating_duration_since(now)
            .max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: valid fd, valid pointer to a local itimerspec, null old.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed = Some(deadline);
        Ok(())
    }

    /// Call when the timer's event arrives: clears its readiness and notes
    /// that it is no longer armed.
    pub fn fired(&mut self) {
        use std::os::fd::AsRawFd;
        let mut expirations = [0u8; 8];
        // SAFETY: valid fd, valid 8-byte buffer. EAGAIN (already read) is fine.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                expirations.as_mut_ptr().cast(),
                expirations.len(),
            )
        };
        self.armed = None;
    }
}
