//! `switchyard route-eval` as a standalone program: compiles the server's subcommand module
//! (server/src/cmd_route_eval.rs) against this crate, so it runs and is tested before (and
//! independently of) the `switchyard` binary.
//!
//! `cargo run -p switchyard-classifier --example route_eval -- --routellm ../shared/data/routellm --split test --out docs/route-eval`

#[path = "../../../server/src/cmd_route_eval.rs"]
mod cmd_route_eval;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "route-eval",
    about = "Routing evaluation (RouteLLM, labelled suite, replay)"
)]
struct Cli {
    #[command(flatten)]
    args: cmd_route_eval::RouteEvalArgs,
}

fn main() -> std::process::ExitCode {
    match cmd_route_eval::run(Cli::parse().args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
