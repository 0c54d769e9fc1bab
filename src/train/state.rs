//! A trainer's whole state as plain data ([`TrainerState`]): what a checkpoint saves and
//! what [`Trainer::from_state`](super::Trainer::from_state) resumes from.

use crate::config::MAX_STEPS;
use crate::error::{check_shape, Error, Result};
use crate::optim::ParamTensors;
use crate::sae::Sae;

/// Everything a [`Trainer`](super::Trainer) carries from one step to the next: the SAE (θ included), Adam's
/// moments and step count, the steps taken and the dead-latent counters. The rest of a
/// trainer (learning rate, rules, workspaces) is derived from its [`TrainConfig`](crate::config::TrainConfig), so a trainer
/// rebuilt from this state and the same config takes exactly the steps the original would
/// have taken.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerState {
    /// The SAE's parameters and θ.
    pub sae: Sae,
    /// Adam's first moments, shaped like the parameters.
    pub adam_m: ParamTensors,
    /// Adam's second moments, shaped like the parameters.
    pub adam_v: ParamTensors,
    /// Adam's step count (its bias correction uses it).
    pub adam_t: u64,
    /// Training steps taken.
    pub step: u64,
    /// Tokens since each latent last fired, F counters.
    pub tokens_since_fired_f: Vec<u64>,
}

impl TrainerState {
    /// Checks that the moments and counters are shaped like the SAE's parameters, that the
    /// step counts agree and stay below [`MAX_STEPS`], and that Adam's second moments are not
    /// negative.
    pub fn validate(&self) -> Result<()> {
        let (f, d) = (self.sae.config().dict_size, self.sae.config().d_model);
        for (what, moment) in [("Adam m", &self.adam_m), ("Adam v", &self.adam_v)] {
            check_shape(
                &format!("{what} w_enc_fd"),
                moment.w_enc_fd.shape(),
                &[f, d],
            )?;
            check_shape(&format!("{what} b_enc_f"), moment.b_enc_f.shape(), &[f])?;
            check_shape(
                &format!("{what} w_dec_fd"),
                moment.w_dec_fd.shape(),
                &[f, d],
            )?;
            check_shape(&format!("{what} b_dec_d"), moment.b_dec_d.shape(), &[d])?;
            check_shape(
                &format!("{what} threshold_f"),
                moment.threshold_f.shape(),
                self.sae.latent_thresholds().shape(),
            )?;
        }
        check_shape(
            "tokens_since_fired_f",
            &[self.tokens_since_fired_f.len()],
            &[f],
        )?;
        // Adam counts one step per training step; its bias correction raises β to the step
        // count as an i32, so a count past that would silently correct wrongly.
        if self.adam_t != self.step || self.step > MAX_STEPS {
            return Err(Error::OutOfRange {
                what: format!(
                    "the state's step count ({}) and Adam's step count ({})",
                    self.step, self.adam_t
                ),
                value: self.adam_t as f64,
                range: format!("equal to each other and at most {MAX_STEPS}"),
            });
        }
        if let Some(v) = [&self.adam_v.w_enc_fd, &self.adam_v.w_dec_fd]
            .into_iter()
            .flat_map(|v_fd| v_fd.iter())
            .chain(self.adam_v.b_enc_f.iter())
            .chain(self.adam_v.b_dec_d.iter())
            .chain(self.adam_v.threshold_f.iter())
            .find(|v| v.is_nan() || **v < 0.0)
        {
            return Err(Error::OutOfRange {
                what: "an Adam second moment".into(),
                value: *v as f64,
                range: "[0, ∞) (they are means of squares)".into(),
            });
        }
        Ok(())
    }
}
