//! A rollout spec checked against the service it is for (its versions,
//! their backends, its health checks and source-CIDR rules): what the
//! spec alone cannot know. Kept apart from [`super::spec`] so that the
//! spec's types sit below the config (which embeds
//! [`super::spec::RolloutDefaults`]) and this check above it.
use crate::{
    config::{BackendState, ServiceConfig},
    target::TargetConfig,
};

use super::spec::{RolloutSpec, Strategy, hooks_problems};

impl RolloutSpec {
    /// Checks the spec against the service it is for: the versions exist,
    /// the target differs from the stable version (rolling: is the same)
    /// and has an active backend, the schedule is sound, the limits are at
    /// least 1, the hooks have a program.
    ///
    /// # Errors
    /// Every problem, one sentence each, naming the field.
    pub fn validate(&self, service: &ServiceConfig) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        if self.service != service.name {
            p.push(format!(
                "service = {:?}, but it is checked against service {:?}",
                self.service, service.name
            ));
        }
        let names: Vec<&str> = service.versions.iter().map(|v| v.name.as_str()).collect();
        let version = |field: &str, name: &str, p: &mut Vec<String>| {
            let found = service.versions.iter().find(|v| v.name == name);
            if found.is_none() {
                p.push(format!(
                    "{field} = {name:?}: no such version of service {:?} (versions: {})",
                    service.name,
                    names.join(", ")
                ));
            }
            found
        };
        let from = version("from", &self.from, &mut p);
        let to = version("to", &self.to, &mut p);
        let rolling = matches!(self.strategy, Strategy::Rolling { .. });
        if rolling {
            if self.from != self.to {
                p.push(format!(
                    "to = {:?}, from = {:?}: a rolling update stays inside one version, so to must equal from (use canary or blue_green to move between versions)",
                    self.to, self.from
                ));
            }
        } else if self.from == self.to {
            p.push(format!(
                "to = {:?} is the stable version (from): the target must be another version",
                self.to
            ));
        }
        let active = |v: &crate::config::VersionConfig| {
            v.backends
                .iter()
                .filter(|b| b.state == BackendState::Active)
                .count()
        };
        if let Some(to) = to
            && active(to) == 0
        {
            p.push(format!(
                "to = {:?}: the target version has no active backend to send flows to",
                to.name
            ));
        }
        if let Strategy::Rolling { batch_size, .. } = &self.strategy {
            if service.health.is_none() {
                p.push(format!(
                    "strategy.kind = \"rolling\" needs health checks ([service.health] of {:?}) so that a redeployed backend is checked before it takes new flows",
                    service.name
                ));
            }
            if let Some(from) = from {
                let n = active(from);
                if *batch_size > 0 && *batch_size as usize >= n {
                    p.push(format!(
                        "strategy.batch_size = {batch_size} would drain all {n} active backend{} of version {:?} at once: at least one must keep serving",
                        if n == 1 { "" } else { "s" },
                        from.name
                    ));
                }
            }
        }
        p.extend(self.strategy.problems());
        p.extend(self.analysis.problems());
        p.extend(hooks_problems(&self.hooks));
        p.extend(self.targets_problems(service));
        if p.is_empty() { Ok(()) } else { Err(p) }
    }

    /// Problems of the targets and the targets step: one without the
    /// other, or rules that clash with the service's own.
    fn targets_problems(&self, service: &ServiceConfig) -> Vec<String> {
        let mut p = Vec::new();
        match (self.has_targets_step(), self.targets.is_empty()) {
            (true, true) => p.push(
                "strategy.steps[0] is a targets step, but no targets are given: name the client networks (`--targets 10.0.1.96/28`, or targets = [...] in [service.rollout])".to_string(),
            ),
            (false, false) => p.push(format!(
                "targets = [{}] are given, but no targets step uses them: start the canary schedule with one (`--steps targets,5,10,25,50,100`)",
                crate::target::cidr_list(&self.targets)
            )),
            _ => {}
        }
        if !self.targets.is_empty() {
            let mut with = service.targets.clone();
            with.extend(self.targets.iter().map(|c| TargetConfig {
                cidr: *c,
                version: self.to.clone(),
            }));
            p.extend(
                service
                    .problems_of_targets(&with)
                    .into_iter()
                    .map(|e| format!("targets: {e}")),
            );
        }
        p
    }
}
