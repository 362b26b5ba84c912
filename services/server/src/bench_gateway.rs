//! `tidings bench gateway`: see BENCHMARKS.md.

#[derive(Debug, clap::Args)]
pub struct GatewayArgs {}

pub async fn run(_args: GatewayArgs, _config: &crate::config::Config) -> anyhow::Result<()> {
    anyhow::bail!("bench gateway is not written yet")
}
