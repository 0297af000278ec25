//! Errors of the daemon core, each mapped to one stable API error code.

use abx_proto::ErrorCode;

use crate::agent::CallError;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{kind} '{id}' not found{}", not_found_hint(kind, id))]
    NotFound { kind: &'static str, id: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    /// Not allowed for this caller (a tenant's key).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("sandbox {id} could not be set up: {message}")]
    Setup { id: String, message: String },
    #[error("{0}")]
    Agent(#[from] CallError),
    #[error("{context}")]
    Internal {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn not_found_hint(kind: &str, id: &str) -> String {
    match kind {
        "template" => format!("; build it with `agentbox template build {id}` (embedded recipes: base, mini)"),
        "sandbox" => "; `agentbox ls` lists sandboxes".to_string(),
        "snapshot" => "; `agentbox snapshot ls` lists snapshots".to_string(),
        "sandbox or snapshot" => "; `agentbox ls` and `agentbox snapshot ls` list them".to_string(),
        "volume" => format!("; create it with `agentbox volume create {id}`"),
        "pool" => "; `agentbox pool ls` lists pools".to_string(),
        "key" => "; `agentbox key ls` lists keys".to_string(),
        _ => String::new(),
    }
}

impl CoreError {
    pub fn internal(context: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        CoreError::Internal { context: context.into(), source: source.into() }
    }

    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        CoreError::NotFound { kind, id: id.into() }
    }

    /// The stable code and HTTP status of this error.
    pub fn code(&self) -> (&'static str, u16) {
        match self {
            CoreError::NotFound { .. } => ("not_found", 404),
            CoreError::Invalid(_) => ("invalid_argument", 400),
            CoreError::Conflict(_) => ("conflict", 409),
            CoreError::Forbidden(_) => ("forbidden", 403),
            CoreError::Exhausted(_) => ("resource_exhausted", 503),
            CoreError::Setup { .. } => ("sandbox_setup_failed", 500),
            CoreError::Internal { .. } => ("internal", 500),
            CoreError::Agent(CallError::Remote(e)) => match e.code {
                ErrorCode::NotFound => ("not_found", 404),
                ErrorCode::CommandNotFound => ("command_not_found", 400),
                ErrorCode::PermissionDenied => ("permission_denied", 403),
                ErrorCode::AlreadyExists => ("already_exists", 409),
                ErrorCode::NotADirectory => ("not_a_directory", 400),
                ErrorCode::IsADirectory => ("is_a_directory", 400),
                ErrorCode::DirectoryNotEmpty => ("directory_not_empty", 409),
                ErrorCode::ResourceExhausted => ("resource_exhausted", 429),
                ErrorCode::InvalidArgument => ("invalid_argument", 400),
                ErrorCode::Io => ("io_error", 500),
            },
            CoreError::Agent(CallError::Timeout(_)) => ("agent_timeout", 504),
            CoreError::Agent(_) => ("agent_unavailable", 502),
        }
    }

    /// The message with its chain of causes, for the API and logs.
    pub fn full_message(&self) -> String {
        chain_text(self)
    }
}

/// An error's message followed by those of its causes (each once: a cause whose text the
/// message already holds is left out), as "request failed: tcp connect error: Connection
/// refused (os error 111)".
pub fn chain_text(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        src = s.source();
    }
    msg
}

pub type CoreResult<T> = Result<T, CoreError>;

#[cfg(test)]
mod tests {
    use super::CoreError;

    #[test]
    fn not_found_names_the_thing_and_how_to_find_one() {
        for (kind, id, text) in [
            ("sandbox", "x1", "sandbox 'x1' not found; `agentbox ls` lists sandboxes"),
            ("volume", "cache", "volume 'cache' not found; create it with `agentbox volume create cache`"),
            ("snapshot", "s", "snapshot 's' not found; `agentbox snapshot ls` lists snapshots"),
            ("pool", "mini", "pool 'mini' not found; `agentbox pool ls` lists pools"),
            ("widget", "w", "widget 'w' not found"),
        ] {
            assert_eq!(CoreError::not_found(kind, id).to_string(), text);
        }
    }
}
