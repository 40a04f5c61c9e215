//! `switchyard serve` (placeholder until the HTTP server lands).

#[derive(clap::Args, Debug)]
pub struct ServeArgs {}

pub fn run(_a: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("serve is not built yet")
}
