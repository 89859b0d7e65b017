//! `gigapath tile`.
#[derive(clap::Args)]
pub struct TileArgs {}

pub fn run(_args: TileArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
