//! `agentbox mcp`: an MCP server on stdin and stdout, for agents that use sandboxes as a
//! tool (Claude Code, Codex, Cursor, ...). It talks to the daemon like every other
//! command (`--host`, `AGENTBOX_HOST`, `AGENTBOX_API_KEY`).

use abx_client::Client;
use clap::Args;

#[derive(Debug, Args)]
pub struct McpArgs {}

pub async fn main(client: Client, _args: McpArgs) -> anyhow::Result<i32> {
    abx_mcp::serve_stdio(client).await?;
    Ok(0)
}
