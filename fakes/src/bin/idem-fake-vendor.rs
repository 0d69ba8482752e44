//! `idem-fake-vendor`: runs the in-project fake vendor (and optionally the SMTP sink) as a
//! standalone process for shell demos.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use idem_fakes::{FakeVendor, SmtpSink};

/// Serve the fake billing/CRM vendor API until SIGTERM or ctrl-c.
#[derive(Debug, Parser)]
#[command(name = "idem-fake-vendor", version)]
struct Args {
    /// Address for the HTTP API.
    #[arg(long, default_value = "127.0.0.1:8079")]
    addr: SocketAddr,
    /// How many invoices to seed.
    #[arg(long, default_value_t = 200)]
    invoices: usize,
    /// Seed the `--invoices` compactly (benchmarks): the same invoices over every
    /// endpoint, byte for byte, but kept as their list position and rendered when served
    /// (under 100 MB for a million instead of ~24 GB). An invoice changed through
    /// `/_fake/update_invoice` is stored in full from then on (~50 KB with its event).
    #[arg(long)]
    bulk: bool,
    /// How many invoices with more than 10 line items (25 each) to seed after the others.
    #[arg(long, default_value_t = 0)]
    long_invoices: usize,
    /// How many HubSpot contacts to seed.
    #[arg(long, default_value_t = 0)]
    contacts: usize,
    /// Charges seeded in each connected account of `connectors/demo_accounts.toml`
    /// (acct_eu, acct_us, acct_uk), served by `GET /v1/charges` per `Stripe-Account`.
    #[arg(long, default_value_t = 20)]
    charges_per_account: usize,
    /// Also run the SMTP sink on this address (its mail is at GET /_fake/mailbox).
    #[arg(long)]
    smtp_addr: Option<SocketAddr>,
    /// Require `Authorization: Bearer TOKEN` on /v1 and /crm.
    #[arg(long)]
    bearer: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let vendor = FakeVendor::start_on(args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    if args.bulk {
        vendor.seed_bulk_invoices(args.invoices);
    } else {
        vendor.seed_invoices(args.invoices);
    }
    vendor.seed_long_invoices(args.long_invoices, 25);
    vendor.seed_contacts(args.contacts);
    for account in ["acct_eu", "acct_us", "acct_uk"] {
        vendor.seed_charges(account, args.charges_per_account);
    }
    if let Some(token) = &args.bearer {
        vendor.require_bearer(token);
    }
    let sink = match args.smtp_addr {
        Some(addr) => {
            let sink = SmtpSink::start_on(addr)
                .await
                .with_context(|| format!("cannot listen for SMTP on {addr}"))?;
            vendor.attach_mailbox(&sink);
            Some(sink)
        }
        None => None,
    };
    let smtp = sink
        .as_ref()
        .map_or_else(|| "off".to_owned(), |s| s.addr().to_string());
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "fake vendor listening on {}; smtp sink on {smtp}",
        vendor.base_url()
    )?;
    out.flush()?;
    drop(out);
    shutdown_signal().await?;
    if let Some(sink) = sink {
        sink.stop().await;
    }
    Ok(())
}

/// Resolves on ctrl-c or (on Unix) SIGTERM.
async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("wait for ctrl-c")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.context("wait for ctrl-c")?;
    Ok(())
}
