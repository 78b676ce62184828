//! Everything a signal or the service manager asks of the server: the
//! signal thread ([`signals`]), SIGHUP's reload ([`reload`]), SIGUSR2's
//! binary upgrade ([`upgrade`]), the pid file ([`pidfile`]) and the systemd
//! integration ([`systemd`]).

pub mod pidfile;
pub mod reload;
pub mod signals;
pub mod systemd;
pub mod upgrade;
