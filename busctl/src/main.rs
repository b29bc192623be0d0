//! `busctl`: see the crate's documentation (`busctl --help`).

use clap::Parser as _;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = busctl::Cli::parse();
    let mut out = std::io::stdout().lock();
    match busctl::run(cli, &mut out).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("busctl: {}", bus_core::logged::chain(&error));
            std::process::ExitCode::FAILURE
        }
    }
}
