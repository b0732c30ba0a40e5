//! The `clasp` command line.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    clasp::tune_allocator();
    // SAFETY: the first lines of `main`: no other thread exists yet.
    unsafe { clasp::tune_threads() };
    // Parsing starts no thread, so the environment may still change here.
    let args = cli::Cli::parse_args();
    if args.is_training() {
        // SAFETY: still no other thread (argument parsing starts none).
        unsafe { clasp::tune_for_training() };
    }
    cli::init_logging(args.verbose, args.quiet);
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes, each cause added only when the text so far does
/// not already say it (clasp's errors print their source themselves, so
/// anyhow's chain would repeat it).
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if text.contains(&c) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&c);
    }
    text
}
