//! idem's integration tests: one binary, each test with its own Postgres database, a real
//! fake vendor over HTTP, and the real `idem` binary where a process must die or race.

mod architecture;
mod child_streams;
mod connectors;
mod console;
mod database;
mod deploy;
mod edges;
mod edges_cursors;
mod first_run;
mod helpers;
mod ledger;
mod ledger_concurrency;
mod ledger_edges;
mod partitions;
mod replay;
mod replicas;
mod rule_passes;
mod security;
mod serve;
mod sync_core;
mod throughput;
