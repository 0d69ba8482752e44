//! The configuration schema, at the bottom of the layers: what connector files and
//! `idem.toml` deserialize into, reminder rules included. It reads no files and touches
//! no network or database, so every module above may use it and it uses none of them.

pub mod connector;
pub mod notify;
pub mod settings;
