//! The `idem` binary: a thin shell over the library's command line.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    idem::cli::main().await
}
