//! `splitter target add|remove|list`: the source-CIDR rules of a service
//! (new flows from a client network go to one version, the longest
//! matching prefix winning; see docs/deployments.md). One API call each;
//! the daemon validates, publishes and saves the change like any runtime
//! edit, so it survives reloads of an unchanged file and restarts.
use std::path::Path;

use clap::Subcommand;
use hyper::Method;

use super::{CliError, Output, edit::seg};
use crate::{client, edit::TargetSpec, report::TargetReport};

/// `splitter target ...`
#[derive(Debug, Subcommand)]
pub enum TargetCommand {
    /// Send new flows from a client network to one version, whatever the
    /// weights say (established flows stay where they are). The longest
    /// matching rule wins; a rule inside another must name a different
    /// version (an exception carved out of it). Refused: a network with
    /// host bits set, one given twice, an unknown version or one without
    /// an active backend.
    ///
    /// Example: splitter target add web 10.0.1.96/28 green
    Add {
        /// Service name.
        service: String,
        /// Client network (`10.0.1.96/28`; a bare address is a /32).
        cidr: String,
        /// Version its clients' new flows go to.
        version: String,
        /// Output format of the service's rules.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Remove the rule for exactly this network: its clients' new flows
    /// follow the weights (or a wider rule) again.
    ///
    /// Example: splitter target remove web 10.0.1.96/28
    Remove {
        /// Service name.
        service: String,
        /// The rule's network, as listed.
        cidr: String,
        /// Output format of the service's rules.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// List a service's rules, longest prefix first. A rule is inactive
    /// while its version has no backend up to take new flows: its clients
    /// then get the weights' choice.
    ///
    /// Example: splitter target list web --output json
    List {
        /// Service name.
        service: String,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// Runs `splitter target ...`.
pub async fn run(socket: &Path, cmd: TargetCommand) -> Result<(), CliError> {
    let (method, path, body, output) = match cmd {
        TargetCommand::Add {
            service,
            cidr,
            version,
            output,
        } => {
            let spec = TargetSpec { cidr, version };
            let body = serde_json::to_string(&spec).map_err(|e| CliError::Other(e.into()))?;
            let path = format!("/v1/services/{}/targets", seg("service", &service)?);
            (Method::POST, path, Some(body), output)
        }
        TargetCommand::Remove {
            service,
            cidr,
            output,
        } => {
            let c: crate::target::Cidr = cidr.parse().map_err(CliError::Usage)?;
            let path = format!(
                "/v1/services/{}/targets/{}/{}",
                seg("service", &service)?,
                c.addr,
                c.len
            );
            (Method::DELETE, path, None, output)
        }
        TargetCommand::List { service, output } => {
            let path = format!("/v1/services/{}/targets", seg("service", &service)?);
            (Method::GET, path, None, output)
        }
    };
    let bytes = client::request(socket, method, &path, body).await?;
    match output {
        Output::Json => print!("{}", String::from_utf8_lossy(&bytes)),
        Output::Table => {
            let rules: Vec<TargetReport> =
                serde_json::from_slice(&bytes).map_err(|e| CliError::Other(e.into()))?;
            print!("{}", render(&rules));
        }
    }
    Ok(())
}

/// The rules as aligned columns.
pub fn render(rules: &[TargetReport]) -> String {
    if rules.is_empty() {
        return "no target rules: every client follows the weights\n".into();
    }
    let w = rules.iter().map(|r| r.cidr.len()).max().unwrap_or(4).max(4);
    let v = rules
        .iter()
        .map(|r| r.version.len())
        .max()
        .unwrap_or(7)
        .max(7);
    let mut out = format!("{:<w$}  {:<v$}  STATE\n", "CIDR", "VERSION");
    for r in rules {
        let state = if r.active {
            "active"
        } else {
            "inactive (no backend up: its clients follow the weights)"
        };
        out.push_str(&format!("{:<w$}  {:<v$}  {state}\n", r.cidr, r.version));
    }
    out
}
