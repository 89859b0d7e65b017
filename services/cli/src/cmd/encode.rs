//! `gigapath encode {tile,slide,text}`: run one encoder on tensors from a file.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum EncodeCommand {
    /// Tile encoder (timm ViT): `tiles` u8 [B,256,256,3] or `pixel_values` f32 [B,3,224,224] in,
    /// `embedding` f32 [B,D] out.
    Tile,
}

pub fn run(cmd: EncodeCommand) -> anyhow::Result<()> {
    match cmd {
        EncodeCommand::Tile => anyhow::bail!("encode tile: not implemented yet"),
    }
}
