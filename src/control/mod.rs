//! Everything a signal or the service manager asks of the server (see
//! `DESIGN.md`): for now, the systemd integration in [`systemd`].

pub mod reload;
pub mod systemd;
