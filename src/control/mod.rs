//! Everything a signal or the service manager asks of the server: the
//! signal thread ([`signals`]), SIGHUP's reload ([`reload`]) and the systemd
//! integration ([`systemd`]).

pub mod reload;
pub mod signals;
pub mod systemd;
