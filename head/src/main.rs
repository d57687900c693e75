//! The `serve` binary: parses nothing itself; see `serval_head::cli`.

fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    let exe = std::env::current_exe()?.display().to_string();
    serval_head::main_with(argv, vec![exe])
}
