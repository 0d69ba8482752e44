//! The `idem` binary: a thin shell over the library's command line.

/// jemalloc, not glibc's malloc: a walk allocates and frees every record's parsed form,
/// and with glibc that was a third of idem's CPU. Measured on 200,000 invoices
/// (BENCHMARKS.md): CPU of an import 19.0 → 12.0 s, of a no-op re-walk a third less;
/// peak RSS 62 → 49 MiB with one arena and small thread caches (below), where jemalloc's
/// defaults gave 67 MiB and mimalloc 133 MiB.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// One arena: idem's few threads hand pages to each other, and per-thread arenas each
/// kept their own freed pages (RSS +35 %). `tcache_max` keeps the per-thread caches to
/// small sizes. `MALLOC_CONF`/`_RJEM_MALLOC_CONF` in the environment still override it.
#[cfg(not(target_env = "msvc"))]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"narenas:1,tcache_max:4096\0";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    idem::cli::main().await
}
