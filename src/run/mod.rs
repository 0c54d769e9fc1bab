//! A training run as the `sae` command runs it: the resolved configuration, several SAEs fed
//! from one pass over the data (a sweep), metrics, checkpoints and resumption.

mod metrics;
mod spec;

pub use metrics::MetricsRecord;
pub use spec::{ArchName, Context, DataSpec, RunSpec, SaeSpec, ScheduleSpec};
