//! `switchyard`: the inference server for sparse MoE models with a request router built in.
//! Subcommands: `serve` (the HTTP server), `generate`, `logits`, `make-test-model`, `bench`,
//! `route`, `route-eval`, `convert-gguf`, `plan`, `run-batch` (offline OpenAI Batch API files).
//! `main` prints the whole error chain and exits non-zero on failure.

mod cmd_bench;
mod cmd_convert;
mod cmd_generate;
mod cmd_make_test_model;
mod cmd_plan;
mod cmd_route;
mod cmd_route_eval;
mod cmd_run_batch;
mod http;
mod loading;
mod serve;
mod vllm_flags;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Inference server for sparse MoE models with a built-in request router",
    // A flag given twice takes its last value (as in most Unix tools), so a wrapper such as
    // `scripts/quickstart.sh --port 9000` can override the defaults it passes.
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the OpenAI- and Anthropic-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Generate text from a prompt or token ids.
    Generate(cmd_generate::GenerateArgs),
    /// Write the logits of every input position to a safetensors file.
    Logits(cmd_generate::LogitsArgs),
    /// Write a random-weight hy_v3 checkpoint with a byte-level BPE tokenizer.
    MakeTestModel(cmd_make_test_model::MakeTestModelArgs),
    /// Measure prefill and decode throughput.
    Bench(cmd_bench::BenchArgs),
    /// Explain the router's decision for a prompt or request without serving it.
    Route(cmd_route::RouteArgs),
    /// Evaluate routing: RouteLLM APGR, a labelled suite, or a replay against a server.
    RouteEval(cmd_route_eval::RouteEvalArgs),
    /// Upcycle a dense llama GGUF into a hy_v3 MoE checkpoint.
    ConvertGguf(cmd_convert::ConvertGgufArgs),
    /// Plan GPU memory: weights per device, KV cache left, whether a context fits.
    Plan(cmd_plan::PlanArgs),
    /// Run an OpenAI Batch API file (JSONL requests) offline through the engine, as vLLM's
    /// `run-batch`: one output line per input line, in input order.
    RunBatch(cmd_run_batch::RunBatchArgs),
}

/// Largest allocation glibc serves from its heaps instead of a fresh `mmap` (its ceiling on
/// 64-bit). A forward pass allocates and frees activation buffers of a few MiB per op; served
/// by `mmap`, each one is page-faulted and zeroed again by the kernel, which took ~30% of a
/// 512-token prefill (`clear_page_erms`, `exc_page_fault`) on the dev VM.
const MMAP_THRESHOLD: i32 = 32 << 20;

/// Free memory at the top of a heap kept for reuse instead of returned to the system: more
/// than the temporaries of one forward pass, so the next pass finds them mapped.
const TRIM_THRESHOLD: i32 = 256 << 20;

/// Lets glibc keep freed activation buffers for the next forward pass (see
/// [`MMAP_THRESHOLD`]). Small preset, bf16, 128-token prompt on the dev VM: prefill
/// 628–648 → 747–769 tok/s, serving RSS +12–24 MiB. `MALLOC_*` environment variables, when
/// set, win.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |var: &str, param: i32, value: i32| {
            if std::env::var_os(var).is_none() {
                // SAFETY: mallopt only changes allocator tuning; called before any thread.
                unsafe { libc::mallopt(param, value) };
            }
        };
        set(
            "MALLOC_MMAP_THRESHOLD_",
            libc::M_MMAP_THRESHOLD,
            MMAP_THRESHOLD,
        );
        set(
            "MALLOC_TRIM_THRESHOLD_",
            libc::M_TRIM_THRESHOLD,
            TRIM_THRESHOLD,
        );
    }
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse_from(loading::expand_tp_alias(std::env::args_os()));
    if !matches!(cli.cmd, Cmd::Serve(_) | Cmd::RouteEval(_)) {
        exit_quietly_on_closed_stdout();
    }
    let r = match cli.cmd {
        Cmd::Serve(a) => serve::run(a),
        Cmd::Generate(a) => cmd_generate::run_generate(a),
        Cmd::Logits(a) => cmd_generate::run_logits(a),
        Cmd::MakeTestModel(a) => cmd_make_test_model::run(a),
        Cmd::Bench(a) => cmd_bench::run(a),
        Cmd::Route(a) => cmd_route::run(a),
        Cmd::ConvertGguf(a) => cmd_convert::run(a),
        Cmd::RouteEval(a) => cmd_route_eval::run(a),
        Cmd::Plan(a) => cmd_plan::run(a),
        Cmd::RunBatch(a) => cmd_run_batch::run(a),
    };
    match r {
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

/// Lets a command whose output is piped into `head` end the way `cat` does (killed by SIGPIPE,
/// silently) instead of panicking in `println!`. Rust ignores SIGPIPE by default so that
/// writing to a closed socket is an error rather than death, so this is done only for the
/// offline commands: `serve` and `route-eval` talk to sockets.
fn exit_quietly_on_closed_stdout() {
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal, before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A repeated flag takes its last value (the quickstart passes `--port` and lets the
    /// user's own `--port` win), on every subcommand; a repeated flag with a bad value still
    /// fails and names it.
    #[test]
    fn repeated_flags_take_the_last_value() {
        let parse = |line: &str| Cli::try_parse_from(line.split(' '));
        let cli = parse("switchyard serve --model m --port 8000 --port 9000").unwrap();
        let Cmd::Serve(a) = cli.cmd else {
            panic!("not serve")
        };
        assert_eq!(a.port(), 9000);
        let cli = parse("switchyard bench --model m --batch 2 --batch 4").unwrap();
        assert!(matches!(cli.cmd, Cmd::Bench(_)));
        let err = parse("switchyard serve --model m --port 8000 --port x")
            .err()
            .expect("a bad last value is an error");
        assert!(err.to_string().contains("--port"), "{err}");
    }
}
