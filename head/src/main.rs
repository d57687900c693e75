//! The `serve` binary: parses nothing itself; see `serval_head::cli`.
#![forbid(unsafe_code)]

/// The same allocator as the Python module that also runs this head
/// (`python -m serval.cli`): see python-sdk/src/lib.rs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    let exe = std::env::current_exe()?.display().to_string();
    serval_head::main_with(argv, vec![exe])
}
