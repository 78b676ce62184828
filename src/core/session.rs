//! A connection as the worker keeps it, and its preface.
//!
//! Most connections are served from their first byte. On a listener whose
//! hooks ask for a preface (a PROXY header from a load balancer), the
//! connection first reads bytes the protocol never sees and feeds them to
//! the hooks; once they say the preface is complete, the session upgrades
//! to [`Session::Serving`] and the bytes that followed it in the same read
//! are the client's first. Sōzu's sessions do the same with their states.

use std::ops::Range;

use crate::core::Core;
use crate::core::hooks::{Hooks, PrefaceEnd, PrefaceStep};
use crate::core::timers::{ConnTimers, TimeoutSecs};
use crate::network::connection::{Connection, Pass, RawRead};
use crate::utils::logger::Level;
use crate::xps_log;

/// What the hooks keep for a connection, by where it is.
pub enum Session<H: Hooks> {
    /// Reading its preface; nothing is answered yet.
    Preface(H::Preface),
    /// Served.
    Serving(H::Conn),
}

/// A connection in the worker's slab.
pub struct Entry<H: Hooks> {
    /// The socket, the unterminated line, the unsent replies.
    pub conn: Connection,
    /// Its deadlines.
    pub timers: ConnTimers,
    /// Preface or served, and the hooks' state.
    pub session: Session<H>,
    /// In the queue to be driven again without an edge (at most once).
    pub queued: bool,
    /// In the queue of connections waiting for a larger allowance.
    pub held: bool,
    /// The turn of its last pass (wrapping): at most one pass per turn.
    pub turn: u32,
}

impl<H: Hooks> Entry<H> {
    /// A connection just created (or taken over) in turn `turn`: not
    /// queued, not held, and not yet driven in this turn. (Inlined: built
    /// in place in the slab, as before it had a constructor.)
    #[inline(always)]
    pub fn new(conn: Connection, timers: ConnTimers, session: Session<H>, turn: u32) -> Entry<H> {
        Entry {
            conn,
            timers,
            session,
            queued: false,
            held: false,
            turn: turn.wrapping_sub(1),
        }
    }
}

impl<H: Hooks> Core<H> {
    /// Reads a connection's preface until it is complete, refused, or the
    /// socket is drained.
    pub(super) fn drive_preface(&mut self, key: usize) {
        let entry = &mut self.connections[key];
        let Session::Preface(preface) = &mut entry.session else {
            return;
        };
        let end = loop {
            match entry.conn.read_raw(&mut self.scratch.read) {
                RawRead::Drained => return,
                RawRead::Again => return self.queue.again(key, entry),
                RawRead::Closed => break PrefaceEnd::Closed,
                RawRead::Failed(reason) => break PrefaceEnd::Failed(reason),
                RawRead::Data(n) => match self.hooks.preface_feed(preface, &self.scratch.read[..n])
                {
                    PrefaceStep::More => {}
                    PrefaceStep::Bad => break PrefaceEnd::Bad,
                    PrefaceStep::Done(used) => {
                        return self.serve_after_preface(key, used.min(n)..n);
                    }
                },
            }
        };
        let Entry { conn, session, .. } = self.remove(key);
        if let Session::Preface(mut preface) = session {
            self.preface_ended(conn, &mut preface, end); // closed unanswered
        }
    }

    /// The preface is complete: the hooks admit the client or refuse it; an
    /// admitted connection answers the bytes that followed the preface
    /// (`rest` of the shared read buffer) and is served from now on.
    fn serve_after_preface(&mut self, key: usize, rest: Range<usize>) {
        let entry = &mut self.connections[key];
        let Session::Preface(preface) = &mut entry.session else {
            return;
        };
        let Some(state) = self.hooks.preface_done(preface, self.clock.now) else {
            // Refused once the client was known: the hooks counted it.
            let Entry { conn, .. } = self.remove(key);
            let why = "refused after its preface";
            xps_log!(
                Level::Trace,
                "xps_connection_destroy()",
                "#{}: closed: {why}",
                conn.id
            );
            conn.destroy(&why);
            return;
        };
        entry.session = Session::Serving(state);
        entry.timers = ConnTimers::new(self.clock.moment, TimeoutSecs::of(self.limits.timeouts));
        if let Some(due) = entry.timers.first_due() {
            self.timers.push(due, key);
        }
        let bytes = &self.scratch.read[rest];
        let first = Pass {
            received: bytes.len(),
            replies: entry.conn.feed_first(bytes, &mut self.scratch.out),
            ..Pass::default()
        };
        // The hooks and timers see the first bytes; the pass that follows
        // sends their replies (left in the shared buffer) and reads on.
        if let Session::Serving(state) = &mut entry.session {
            self.hooks.on_pass(state, &first, &entry.conn);
        }
        if let Some(due) = entry
            .timers
            .after_pass(self.clock.moment, &first, &entry.conn, true)
        {
            self.timers.push(due, key);
        }
        self.drive(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_connection_costs_at_most_192_bytes_in_the_slab() {
        // The slab entry (the connection, its timers and the hooks' state)
        // of a plain idle connection: its whole user-space cost but for its
        // entry in the deadline heap (16 bytes).
        // In debug builds mio's socket carries a selector id (8 bytes) that
        // release builds leave out.
        let debug = if cfg!(debug_assertions) { 8 } else { 0 };
        let plain = std::mem::size_of::<Entry<()>>();
        let production = std::mem::size_of::<Entry<crate::features::Features>>();
        assert!(plain <= 160 + debug, "Entry<()> is {plain} bytes");
        assert!(
            production <= 192 + debug,
            "Entry<Features> is {production} bytes"
        );
    }
}
