//! eXpServer's `network/`: the listener and connection modules, and the
//! socket details they share ([`io`]).
pub mod connection;
pub mod io;
pub mod listener;
