//! `gigapath serve`: the HTTP service over a data dir (crate `gigapath-api`).

use anyhow::Result;
use clap::Args;
use gigapath_api::Service;

use crate::cmd::ingest::DataArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Address to listen on (overrides serve.bind; port 0 picks a free port).
    #[arg(long)]
    pub bind: Option<String>,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let mut config = args.data.load()?;
    if let Some(b) = args.bind {
        config.serve.bind = b;
    }
    config.validate()?;
    let service = Service::start(config)?;
    eprintln!(
        "gigapath: serving on http://{} (OpenAPI: /v1/openapi.json; Ctrl-C stops)",
        service.addr
    );
    println!(
        "{}",
        serde_json::json!({"listening": format!("http://{}", service.addr)})
    );
    service.wait();
    Ok(())
}
