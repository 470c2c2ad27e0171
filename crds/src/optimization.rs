//! The optimisation goal of a pool: what the user trades, shared by the InferencePool spec and the
//! sidecar's `INFERPOOL_OPTIMIZATION`, which picks the model variant and graph optimisation.

use serde::{Deserialize, Serialize};

/// What a pool optimises for; each picks a model variant and runtime settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "pool", derive(schemars::JsonSchema))]
pub enum Optimization {
    /// Highest throughput: fp16 on GPUs; some accuracy may be traded.
    Speed,
    /// Fast with no measurable accuracy loss.
    #[default]
    Balanced,
    /// Full precision (fp32), exact graph optimisations only.
    Accuracy,
    /// Smallest memory footprint (int8 where the model has it).
    Memory,
}

impl Optimization {
    /// The name the spec and `INFERPOOL_OPTIMIZATION` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Speed => "Speed",
            Self::Balanced => "Balanced",
            Self::Accuracy => "Accuracy",
            Self::Memory => "Memory",
        }
    }
}

impl std::str::FromStr for Optimization {
    type Err = String;
    /// Parses a name, ignoring case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "speed" => Ok(Self::Speed),
            "balanced" => Ok(Self::Balanced),
            "accuracy" => Ok(Self::Accuracy),
            "memory" => Ok(Self::Memory),
            _ => Err(format!("unknown optimization {s:?} (expected Speed, Balanced, Accuracy or Memory)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_case_is_ignored() {
        for o in [Optimization::Speed, Optimization::Balanced, Optimization::Accuracy, Optimization::Memory] {
            assert_eq!(o.as_str().parse::<Optimization>(), Ok(o));
            assert_eq!(o.as_str().to_uppercase().parse::<Optimization>(), Ok(o));
        }
        assert!("fast".parse::<Optimization>().is_err_and(|e| e.contains("expected Speed, Balanced")));
    }
}
