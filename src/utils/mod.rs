//! eXpServer's `utils/`: the logger (and, as later stages need them, more).
pub mod logger;
