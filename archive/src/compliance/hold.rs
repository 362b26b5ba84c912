//! Legal holds.
