//! snaprelay's flow tests, as one test binary (a binary per file would link the whole crate
//! a dozen times). Each module is one flow, against real files, sockets, processes and (with
//! `scripts/test.sh`) a real S3 server; each scenario says in its comment what it proves.

mod support;

mod chunk_index;
mod chunk_proofs;
mod concurrent_fetch;
mod config_inputs;
mod corruption;
mod crash_safety;
mod daemon_faults;
mod demo;
mod deployment;
mod e2e_cluster;
mod e2e_counter;
mod full_disk;
mod gc;
mod gc_interleavings;
mod handover;
mod hint;
mod hostile_fs;
mod incarnation;
mod incremental;
mod layout;
mod marks;
mod operate;
mod packs;
mod roundtrip;
mod signing;
mod store_conformance;
mod streaming;
mod streaming_packs;
mod systemd_notify;
