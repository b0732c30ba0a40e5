//! The `clasp` command line.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    clasp::tune_allocator();
    clasp::tune_threads();
    // Parsing starts no thread, so the environment may still change here.
    let args = cli::Cli::parse_args();
    if args.is_training() {
        clasp::tune_for_training();
    }
    cli::init_logging(args.verbose, args.quiet);
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
