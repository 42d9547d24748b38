//! `splitter detach`: through the daemon when one runs (it removes the pins
//! and stops, which detaches XDP), directly on the pin directory otherwise.
use std::path::Path;

use hyper::Method;

use super::CliError;
use crate::{
    client::{self, ClientError},
    pins,
};

/// Detaches and prints what was removed.
pub async fn run(socket: &Path, pin_dir: &Path, state_dir: &Path) -> Result<(), CliError> {
    match client::request(socket, Method::POST, "/v1/detach", None).await {
        Ok(body) => {
            let v: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| CliError::Other(e.into()))?;
            let n = v["removed"].as_array().map(Vec::len).unwrap_or(0);
            println!("detached: the daemon removed {n} pins and is stopping");
            Ok(())
        }
        Err(ClientError::Unreachable { .. }) => {
            let removed = pins::remove_all(pin_dir).map_err(|e| CliError::Other(e.into()))?;
            crate::state::remove(state_dir).map_err(|e| CliError::Other(e.into()))?;
            if removed.is_empty() {
                println!("nothing to detach in {}", pin_dir.display());
            } else {
                println!(
                    "detached: removed {} pins from {}",
                    removed.len(),
                    pin_dir.display()
                );
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
