//! `gigapath slide info`: what a slide file holds.
use clap::Subcommand;

#[derive(Subcommand)]
pub enum SlideCommand {
    /// Print vendor, levels, mpp (and how it was found), objective power and associated images.
    Info,
}

pub fn run(_cmd: SlideCommand) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
