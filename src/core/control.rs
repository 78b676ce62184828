//! What another thread may ask of a running worker, delivered through a
//! channel and the worker's waker, and applied at the start of
//! `after_events`: a reload (SIGHUP), a snapshot of the connections
//! (`/api/connections`), and an upgrade's steps (SIGUSR2,
//! `core/handover.rs`).

use std::net::SocketAddr;
use std::sync::mpsc::Sender;

use crate::config::{Limits, ListenAddr};
use crate::core::Core;
use crate::core::handover::{ListenerCopy, Moved, Sink};
use crate::core::hooks::Hooks;
use crate::network::listener::Listener;
use crate::utils::logger::Level;
use crate::xps_log;

/// A message to one worker.
pub enum Control<H: Hooks> {
    /// Apply a reloaded configuration.
    Reconfigure(Reconfigure<H::Update>),
    /// An upgrade begins: answer with copies of the listening sockets.
    ListListeners(Sender<Vec<ListenerCopy>>),
    /// The new process accepts: stop accepting, move every connection out.
    HandOver(Sink),
    /// The hand-over failed: serve these listeners again, move nothing
    /// more; say when done.
    Resume(Vec<Listener>, Sender<()>),
    /// Connections moved here from another process.
    Adopt(Vec<Moved>),
    /// Describe every connection and listener to this callback (once).
    Snapshot(crate::core::snapshot::Reply),
}

/// A worker's share of a reload.
pub struct Reconfigure<U> {
    /// New listening sockets (already bound and listening).
    pub add: Vec<Listener>,
    /// Listeners to close, by bound address; their connections go on.
    pub remove: Vec<SocketAddr>,
    /// Kept listeners (by bound address) whose configuration changed, such
    /// as the PROXY flag: it applies to connections accepted from now on.
    pub changed: Vec<(SocketAddr, ListenAddr)>,
    /// Limits for connections accepted from now on.
    pub limits: Limits,
    /// The hooks' share (access rules and the like).
    pub update: U,
    /// Told once the worker has applied it (its removed listeners are
    /// closed), so the next reload can bind their addresses again.
    pub applied: Sender<()>,
}

impl<H: Hooks> Core<H> {
    /// Step 0: applies what the control thread sent.
    pub(super) fn apply_control(&mut self) {
        let Some(rx) = &self.control else {
            return;
        };
        let msgs: Vec<Control<H>> = rx.try_iter().collect();
        for msg in msgs {
            match msg {
                Control::Reconfigure(r) => self.reconfigure(r),
                Control::ListListeners(reply) => {
                    let _ = reply.send(self.listener_copies());
                }
                Control::HandOver(sink) => self.start_hand_over(sink),
                Control::Resume(listeners, done) => {
                    self.resume(listeners);
                    let _ = done.send(());
                }
                Control::Adopt(conns) => self.queue_adopt(conns),
                Control::Snapshot(reply) => self.snapshots_asked.push(reply),
            }
        }
    }

    /// A reload: removed listeners close now (their connections go on), new
    /// ones are attached, changed ones take their new configuration, and
    /// new limits apply to connections accepted from now on.
    fn reconfigure(&mut self, r: Reconfigure<H::Update>) {
        if self.shutdown.is_none() {
            let gone: Vec<usize> = self
                .listeners
                .iter()
                .filter(|(_, ls)| r.remove.contains(&ls.listener.bound))
                .map(|(k, _)| k)
                .collect();
            for key in gone {
                self.listeners.remove(key).listener.destroy();
            }
            for (_, ls) in self.listeners.iter_mut() {
                if let Some((_, addr)) = r.changed.iter().find(|(at, _)| *at == ls.listener.bound) {
                    ls.listener.addr = addr.clone();
                    self.hooks.listener_changed(&mut ls.state, addr);
                }
            }
            for listener in r.add {
                let addr = listener.addr.clone();
                if let Err(e) = self.listener_attach(listener) {
                    xps_log!(
                        Level::Warning,
                        "xps_core_reload()",
                        "cannot watch the new listener {addr}: {e}"
                    );
                }
            }
            self.limits = r.limits;
            self.hooks.reconfigure(r.update);
        }
        let _ = r.applied.send(());
    }
}
