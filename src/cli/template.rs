//! `template ls|build|rm|inspect`.

use abx_client::{BuildEvent, BuildTemplate, Client};
use anyhow::bail;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use super::parse;

#[derive(Debug, Subcommand)]
pub enum TemplateCmd {
    /// List templates.
    Ls,
    /// Build a template: an embedded recipe (base, mini) or a host directory.
    Build {
        /// Template name (also the recipe, unless --recipe or --from-dir is given).
        name: String,
        /// Embedded recipe to use (base: Debian 12 via debootstrap; mini: busybox).
        #[arg(long, conflicts_with = "from_dir")]
        recipe: Option<String>,
        /// Import this host directory as the template's root filesystem.
        #[arg(long)]
        from_dir: Option<std::path::PathBuf>,
    },
    /// Make a template from a snapshot: the snapshot's template layers (shared) plus one
    /// layer with the sandbox's changes.
    Create {
        /// Template name.
        name: String,
        /// Snapshot id or name.
        #[arg(long, required = true)]
        from_snapshot: String,
    },
    /// Remove templates (layers still in use are kept).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Show a template as JSON.
    Inspect { name: String },
}

pub async fn main(client: &Client, cmd: TemplateCmd) -> anyhow::Result<i32> {
    match cmd {
        TemplateCmd::Ls => {
            println!("{:<20} {:<8} {:<10} {:<10} RECIPE", "NAME", "LAYERS", "SIZE", "CREATED");
            for t in client.templates().await? {
                println!(
                    "{:<20} {:<8} {:<10} {:<10} {}",
                    t.name,
                    t.layers.len(),
                    parse::human_size(t.size_bytes),
                    parse::relative(t.created_at),
                    t.recipe
                );
            }
        }
        TemplateCmd::Build { name, recipe, from_dir } => {
            let from_dir = match from_dir {
                Some(d) => Some(std::fs::canonicalize(&d).map_err(|e| anyhow::anyhow!("{}: {e}", d.display()))?),
                None => None,
            };
            let t = build_with(client, &name, recipe, from_dir.map(|d| d.display().to_string())).await?;
            println!("{} ({} layer(s), {})", t.name, t.layers.len(), parse::human_size(t.size_bytes));
        }
        TemplateCmd::Create { name, from_snapshot } => {
            let req = BuildTemplate { name, from_snapshot: Some(from_snapshot), ..Default::default() };
            let t = build_request(client, req).await?;
            println!("{} ({} layer(s), {})", t.name, t.layers.len(), parse::human_size(t.size_bytes));
        }
        TemplateCmd::Rm { names } => {
            for n in names {
                client.delete_template(&n).await?;
                println!("{n}");
            }
        }
        TemplateCmd::Inspect { name } => println!("{}", serde_json::to_string_pretty(&client.template(&name).await?)?),
    }
    Ok(0)
}

/// Builds an embedded template with a progress bar.
pub async fn build(client: &Client, name: &str, recipe: Option<String>) -> anyhow::Result<abx_client::Template> {
    build_with(client, name, recipe, None).await
}

async fn build_with(
    client: &Client,
    name: &str,
    recipe: Option<String>,
    from_dir: Option<String>,
) -> anyhow::Result<abx_client::Template> {
    build_request(client, BuildTemplate { name: name.into(), recipe, from_dir, from_snapshot: None }).await
}

async fn build_request(client: &Client, req: BuildTemplate) -> anyhow::Result<abx_client::Template> {
    let name = req.name.clone();
    let name = name.as_str();
    let mut stream = client.build_template(&req).await?;
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix:>12} {bar:30} {pos}/{len} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let mut last_stage = String::new();
    while let Some(ev) = stream.next().await? {
        match ev {
            BuildEvent::Progress { stage, done, total, message } => {
                if stage != last_stage {
                    if !last_stage.is_empty() && !bar.is_hidden() {
                        bar.println(format!("  {last_stage} done"));
                    }
                    last_stage = stage.clone();
                    bar.set_prefix(stage);
                }
                bar.set_length(total.unwrap_or(0));
                bar.set_position(done);
                bar.set_message(message);
            }
            BuildEvent::Done { template } => {
                bar.finish_and_clear();
                eprintln!("built template {} in {:.1?}", template.name, bar.elapsed());
                return Ok(template);
            }
            BuildEvent::Error { message, .. } => {
                bar.finish_and_clear();
                bail!("building template {name} failed: {message}");
            }
        }
    }
    bar.finish_and_clear();
    bail!("the daemon ended the build of {name} without a result")
}
