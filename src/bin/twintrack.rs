//! The `twintrack` command. Everything lives in [`twintrack::cli`]; this only runs it.

fn main() -> std::process::ExitCode {
    twintrack::cli::main()
}
