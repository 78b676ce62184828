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
//! Two differences from the C loop, both on purpose:
//!
//! * **Tokens, not fds.** Each registration carries a [`Token`] that the owner
//!   chose (the connection's slab key, or a listener's index), so dispatch is
//!   an O(1) lookup instead of the tutorial's scan of the global `listeners`
//!   and `connections` lists.
//! * **Edge-triggered.** mio registers with `EPOLLET`: an event says "this
//!   socket became ready", once. The handler must read (or write) until the
//!   kernel says `WouldBlock` — or until a short read/write proves the buffer
//!   drained — or it will never hear of that socket again. In exchange each
//!   socket is registered once, for reading and writing, and never re-armed:
//!   no `epoll_ctl` per event.
//!
//! The loop knows nothing about listeners or connections: it waits, hands each
//! event to a [`Handler`], and asks the handler how long it may sleep next
//! (timers) and whether to stop.

use std::io;
use std::time::Duration;

use mio::event::{Event, Source};
use mio::{Events, Interest, Poll, Registry, Token, Waker};

/// Events fetched per `epoll_wait` (the tutorial's `MAX_EPOLL_EVENTS` is 32;
/// more per call means fewer calls under load).
pub const MAX_EVENTS: usize = 1024;

/// What the loop drives: the core implements this.
pub trait Handler {
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

    /// `xps_loop_detach()`: stop watching `source`. Closing a socket detaches
    /// it too; this is for sockets that stay open (a paused listener).
    pub fn detach<S: Source + ?Sized>(&self, source: &mut S) -> io::Result<()> {
        self.registry.deregister(source)
    }
}
