//! eXpServer's `network/`: the listener and connection modules.
pub mod connection;
pub mod listener;
pub mod proxy_header;
