//! The `nightlight` binary: everything happens in [`nightlight::cli`].

fn main() -> std::process::ExitCode {
    nightlight::cli::main()
}
