//! Operator operations, one function each, as the CLI calls them: deploy,
//! delete a deployment, list instances, upload releases and cloud-configs.
//! Each one strings the pure stages (parse, validate, resolve, plan)
//! together with the executor, and reports through a [`Report`] sink.
//!
//! This module must not print or read the terminal: the CLI does that
//! through [`Report`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use bosun_agent::client::wait_for_agent;
use bosun_agent::protocol::{AgentState, ProcessState};
use bosun_cpi::chain::Chain;
use bosun_cpi::{StemcellSpec, AGENT_PORT};

use crate::execute::executor::{
    futures_join_all, Cpis, ExecError, ExecOptions, Executor, Progress,
};
use crate::execute::repair::StateChange;
use crate::execute::run::ExecSummary;
use crate::model::cloud_config::{self, CloudConfig};
use crate::model::manifest::{self, Manifest};
use crate::model::problems::Problems;
use crate::plan::desired::{self, ResolveError};
use crate::plan::diff::DiffLine;
use crate::plan::planner::{self, Actual, Plan, PlanError};
use crate::release::{self, ReleaseError};
use crate::store::{
    DeploymentRecord, InstanceRecord, ReleaseRecord, StateError, StemcellRecord, Store,
};

mod cleanup;
mod deploy;
mod errands;
mod export;
mod instances;
mod uploads;

pub use cleanup::CleanUpPlan;
pub use deploy::{DeployOptions, DeployOutcome, Prepared};
pub use errands::{ErrandOptions, ErrandRun};
pub use instances::{instance_matches, CommandRun, InstanceInfo, LineSink, ProcessInfo};
pub use uploads::host_os;

/// An operation failure.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Problems(#[from] Problems),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Release(#[from] ReleaseError),
    #[error("deployment '{0}' does not exist")]
    NoDeployment(String),
    #[error("deploy cancelled")]
    Cancelled,
    #[error("{0}")]
    Stemcell(String),
    #[error(transparent)]
    Interpolate(#[from] crate::interpolate::InterpolateError),
    #[error(transparent)]
    VarStore(#[from] crate::interpolate::StoreError),
    #[error(transparent)]
    Export(#[from] export::ExportError),
}

/// What the CLI shows the operator.
pub trait Report: Progress {
    /// A one-off notice.
    fn notice(&self, msg: &str);
}

/// The director: the store and the CPIs.
pub struct Director {
    pub store: Arc<Store>,
    pub cpis: Cpis,
    pub opts: ExecOptions,
    /// Opens the blobstores of release directories a deploy reads (their
    /// final builds); [`crate::release::LocalOnly`] knows `local` only.
    pub blobstores: Arc<dyn crate::release::BlobstoreProviders>,
}

/// Turn an agent failure into an operation error naming what was done.
fn agent_err(what: String) -> impl FnOnce(bosun_agent::client::ClientError) -> OpError {
    move |source| {
        OpError::Exec(ExecError::Agent {
            what,
            source: Box::new(source),
        })
    }
}

fn read(path: &Path) -> Result<String, OpError> {
    std::fs::read_to_string(path).map_err(|source| OpError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl Director {
    pub fn executor(&self, progress: Arc<dyn Progress>) -> Executor {
        self.executor_as(progress, "deploy")
    }

    /// An executor whose events name `source` as their origin.
    pub fn executor_as(&self, progress: Arc<dyn Progress>, source: &str) -> Executor {
        Executor {
            store: self.store.clone(),
            cpis: self.cpis.clone(),
            progress,
            opts: self.opts.clone(),
            source: source.to_string(),
        }
    }
}

/// Progress nobody watches.
struct QuietProgress;

impl Progress for QuietProgress {
    fn stage(&self, _: &str, _: &str) {}
}

struct ReportProgress(Arc<dyn Report>);

impl Progress for ReportProgress {
    fn stage(&self, subject: &str, stage: &str) {
        self.0.stage(subject, stage);
    }
}
