//! runnel: an edge agent that runs Python flows written in Bytewax's
//! vocabulary on a Rust windowing engine. See README.md.

mod agent;
mod cli;
mod config;
mod decode;
mod engine;
mod flow;
mod flows;
mod json;
mod memory;
mod metrics;
mod mqtt;
mod perms;
mod python;
mod sinks;
mod sources;
mod store;
mod systemd;
mod time;
mod value;

fn main() -> std::process::ExitCode {
    cli::main()
}
