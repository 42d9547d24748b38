//! `splitter weights set SERVICE VERSION=WEIGHT...`
use std::{collections::BTreeMap, path::Path};

use hyper::Method;

use super::{CliError, Output};
use crate::api::WeightsRequest;

/// Parses `VERSION=WEIGHT` pairs (syntax only; the daemon checks names).
pub fn parse_pairs(args: &[String]) -> Result<BTreeMap<String, u32>, CliError> {
    let mut out = BTreeMap::new();
    for arg in args {
        let (name, value) = arg.split_once('=').ok_or_else(|| {
            CliError::Usage(format!(
                "{arg:?} is not VERSION=WEIGHT (for example blue=90)"
            ))
        })?;
        let weight: u32 = value.trim().parse().map_err(|_| {
            CliError::Usage(format!(
                "{arg:?}: weight {value:?} is not a whole number >= 0"
            ))
        })?;
        if name.is_empty() {
            return Err(CliError::Usage(format!(
                "{arg:?}: the version name is empty"
            )));
        }
        if out.insert(name.to_string(), weight).is_some() {
            return Err(CliError::Usage(format!("version {name:?} is given twice")));
        }
    }
    Ok(out)
}

/// Sends the weights and prints the resulting service.
pub async fn set(
    socket: &Path,
    service: &str,
    args: &[String],
    output: Output,
) -> Result<(), CliError> {
    let weights = parse_pairs(args)?;
    let body = serde_json::to_string(&WeightsRequest { weights })
        .map_err(|e| CliError::Other(e.into()))?;
    let path = format!(
        "/v1/services/{}/weights",
        super::edit::seg("service", service)?
    );
    super::edit::call(socket, Method::PUT, &path, Some(body), output).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn pairs_parse_and_reject_bad_syntax() {
        let ok = parse_pairs(&s(&["blue=90", "green=10"])).ok();
        assert_eq!(
            ok.map(|m| m.into_iter().collect::<Vec<_>>()),
            Some(vec![("blue".into(), 90), ("green".into(), 10)])
        );
        for bad in [
            &["blue"][..],
            &["blue=-1"],
            &["blue=x"],
            &["=5"],
            &["a=1", "a=2"],
        ] {
            assert!(
                matches!(parse_pairs(&s(bad)), Err(CliError::Usage(_))),
                "{bad:?}"
            );
        }
    }
}
