//! Where tensors live: the one parser of `cpu` / `cuda` for every front end.

use std::str::FromStr;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A compute device by name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Cpu,
    /// GPU 0; needs the `cuda` cargo feature.
    Cuda,
}

impl DeviceKind {
    /// Opens the device, with an error that says how to get CUDA when this
    /// build lacks it.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceKind::Cpu => Ok(Device::Cpu),
            DeviceKind::Cuda if !cfg!(feature = "cuda") => Err(Error::Report(
                "this clasp was built without CUDA; rebuild with `cargo build --release --features cuda`"
                    .into(),
            )),
            DeviceKind::Cuda => Ok(Device::new_cuda(0)?),
        }
    }
}

impl FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            other => Err(format!("unknown device `{other}` (cpu or cuda)")),
        }
    }
}
