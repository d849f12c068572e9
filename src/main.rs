//! `patchrelay`: see `patchrelay --help` and the README.

fn main() -> std::process::ExitCode {
    patchrelay::cli::main()
}
