//! eXpServer's `utils/`: the logger, and a rate-limited warning.
pub mod logger;
pub mod ratelimit;
