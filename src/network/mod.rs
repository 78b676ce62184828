//! eXpServer's `network/`: the listener and connection modules, the socket
//! details they share ([`io`]), and the PROXY protocol header's parser.
pub mod connection;
pub mod io;
pub mod listener;
pub mod proxy_header;
