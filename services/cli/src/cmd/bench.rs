//! `gigapath bench ...`.
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Tile reading throughput.
    Tiles,
}

pub fn run(_cmd: BenchCommand) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
