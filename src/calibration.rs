//! Calibration statistics (`convert --calibration`): per weight, the second moment
//! G = Σ_t x_t x_tᵀ of the layer's inputs, written by `cersa_torch.calibrate`
//! (docs/calibration.md). This module reads and checks the file; the whitened
//! truncation that uses G lives in [`crate::decompose::whiten`].

use crate::decompose::whiten::Whitener;
use crate::error::{ConvertError, Result};
use crate::input::safetensors::SafetensorsSource;
use crate::input::Source;
use cersa_loader::manifest::CalibrationConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Value of the file's `__metadata__.format`.
pub const CALIBRATION_FORMAT: &str = "cersa-calibration";
/// The version of docs/calibration.md this reader implements.
pub const CALIBRATION_VERSION: u32 = 1;
/// Default relative damping δ: λ = δ·trace(G)/dim(G) is added to G's diagonal (1 % of the
/// mean input energy per feature, as GPTQ damps its Hessian), so G + λI is positive
/// definite even for inputs that span fewer than dim(G) directions.
pub const DEFAULT_DAMPING: f64 = 0.01;

/// Which axis of a stored weight meets the layer's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputAxis {
    /// `[out, in]`, y = W x (`nn.Linear`): G is n×n and whitens from the right.
    Columns,
    /// `[in, out]`, y = x W (GPT-2 `Conv1D`): G is m×m and whitens from the left.
    Rows,
}

impl InputAxis {
    /// The axis number of docs/calibration.md (`input_axis`).
    pub fn number(self) -> u8 {
        match self {
            InputAxis::Rows => 0,
            InputAxis::Columns => 1,
        }
    }
}

#[derive(Deserialize)]
struct Document {
    version: u32,
    #[serde(default)]
    model: serde_json::Value,
    #[serde(default)]
    text: serde_json::Value,
    weights: BTreeMap<String, WeightEntry>,
}

#[derive(Deserialize)]
struct WeightEntry {
    stat: String,
    input_axis: u8,
}

/// One weight's statistics: where they are and on which axis.
#[derive(Debug, Clone, Copy)]
struct WeightStat {
    tensor: usize,
    axis: InputAxis,
}

/// The input statistics of one weight, read and checked.
#[derive(Debug)]
pub struct InputStats {
    /// G, row-major d×d, symmetric.
    pub g: Vec<f64>,
    /// d.
    pub dim: usize,
    /// The axis of the weight it belongs to.
    pub axis: InputAxis,
}

/// An opened calibration file.
pub struct Calibration {
    path: PathBuf,
    source: SafetensorsSource,
    weights: BTreeMap<String, WeightStat>,
    /// What the manifest's `config.calibration` records.
    pub config: CalibrationConfig,
}

impl std::fmt::Debug for Calibration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Calibration")
            .field("path", &self.path)
            .field("weights", &self.weights.len())
            .finish()
    }
}

/// Refuses statistics for stacked experts tensor `i` of `src`: its experts are factored
/// one at a time without whitening (convert and inspect alike).
pub fn refuse_for_experts(cal: Option<&Calibration>, src: &dyn Source, i: usize) -> Result<()> {
    let meta = &src.tensors()[i];
    if !cal.is_some_and(|c| c.has(&meta.name)) {
        return Ok(());
    }
    Err(ConvertError::Tensor {
        path: src.file_path(meta.file).to_path_buf(),
        tensor: meta.name.clone(),
        reason: "calibration statistics for a stacked experts tensor are not supported (its \
                 experts are factored one at a time without whitening)"
            .into(),
    })
}

impl Calibration {
    /// Opens and checks `path`: a safetensors file whose metadata says `cersa-calibration`
    /// version 1, whose every weight entry names a stored square F32/F64 statistic.
    /// `damping` is δ (≥ 0, finite; checked by the caller's config).
    pub fn open(path: &Path, damping: f64) -> Result<Self> {
        let bad = |reason: String| ConvertError::Source {
            path: path.to_path_buf(),
            reason,
        };
        cersa_loader::regular::check_regular(path)
            .map_err(|e| bad(format!("{e} (a calibration file of cersa_torch.calibrate)")))?;
        let source = SafetensorsSource::open(path)?;
        let meta = source.metadata();
        if meta.get("format").map(String::as_str) != Some(CALIBRATION_FORMAT) {
            return Err(bad(format!(
                "not a calibration file: __metadata__.format is {:?}, expected \
                 \"{CALIBRATION_FORMAT}\" (docs/calibration.md)",
                meta.get("format")
            )));
        }
        let doc_text = meta
            .get("cersa_calibration")
            .ok_or_else(|| bad("__metadata__ has no `cersa_calibration` document".into()))?;
        let doc: Document = serde_json::from_str(doc_text)
            .map_err(|e| bad(format!("__metadata__.cersa_calibration: {e}")))?;
        if doc.version != CALIBRATION_VERSION {
            return Err(bad(format!(
                "calibration version {} (this cersa reads version {CALIBRATION_VERSION})",
                doc.version
            )));
        }
        let index: BTreeMap<&str, usize> = source
            .tensors()
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let mut weights = BTreeMap::new();
        for (name, entry) in &doc.weights {
            let tensor_err = |reason: String| ConvertError::Tensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                reason,
            };
            let axis = match entry.input_axis {
                0 => InputAxis::Rows,
                1 => InputAxis::Columns,
                a => return Err(tensor_err(format!("input_axis {a}: expected 0 or 1"))),
            };
            let &tensor = index.get(entry.stat.as_str()).ok_or_else(|| {
                tensor_err(format!("its statistic `{}` is not in the file", entry.stat))
            })?;
            let t = &source.tensors()[tensor];
            if !matches!(t.source_dtype.as_str(), "F32" | "F64") {
                return Err(tensor_err(format!(
                    "statistic `{}` is {}, expected F32 or F64",
                    entry.stat, t.source_dtype
                )));
            }
            if t.shape.len() != 2 || t.shape[0] != t.shape[1] || t.shape[0] == 0 {
                return Err(tensor_err(format!(
                    "statistic `{}` has shape {:?}, expected a square [d, d]",
                    entry.stat, t.shape
                )));
            }
            weights.insert(name.clone(), WeightStat { tensor, axis });
        }
        let sha256 = file_sha256(path)?;
        let config = CalibrationConfig {
            sha256,
            damping,
            weights: weights.len(),
            model: doc.model,
            text: doc.text,
        };
        Ok(Calibration {
            path: path.to_path_buf(),
            source,
            weights,
            config,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file has statistics for the weight `name`.
    pub fn has(&self, name: &str) -> bool {
        self.weights.contains_key(name)
    }

    /// Names of the weights with statistics.
    pub fn weight_names(&self) -> impl Iterator<Item = &str> {
        self.weights.keys().map(String::as_str)
    }

    /// A calibration file must be of this model: statistics for at least one of its tensors,
    /// and the same `config.json` when both know one.
    pub fn check_source(&self, src: &dyn Source) -> Result<()> {
        let path = self.path().to_path_buf();
        let covered = src.tensors().iter().filter(|t| self.has(&t.name)).count();
        if covered == 0 {
            let example = self.weight_names().next().unwrap_or("(none)").to_string();
            return Err(ConvertError::Source {
                path,
                reason: format!(
                    "its statistics name none of the source's tensors (e.g. `{example}`): it was \
                     collected on another model, or on a model whose tensor names differ"
                ),
            });
        }
        let recorded = self
            .config
            .model
            .get("config_sha256")
            .and_then(|v| v.as_str());
        let config = crate::side_files::source_dir(src).map(|d| d.join("config.json"));
        if let (Some(recorded), Some(config)) = (recorded, config.filter(|c| c.is_file())) {
            use sha2::{Digest, Sha256};
            let bytes = cersa_loader::regular::read_regular(&config)
                .map_err(|e| ConvertError::io(&config, "read", e))?;
            let ours = cersa_loader::writer::hex(&Sha256::digest(&bytes));
            if ours != recorded {
                return Err(ConvertError::Source {
                    path,
                    reason: format!(
                        "it was collected on a model whose config.json has sha256 {recorded}, \
                         but {} has {ours}: statistics of another model?",
                        config.display()
                    ),
                });
            }
        }
        Ok(())
    }

    /// The whitening of source tensor `i` (an m×n matrix view) when this file has
    /// statistics for it, checked against the matrix's shape.
    pub fn whitener(
        &self,
        src: &dyn Source,
        i: usize,
        m: usize,
        n: usize,
    ) -> Result<Option<Whitener>> {
        let meta = &src.tensors()[i];
        let Some(stats) = self.stats(&meta.name)? else {
            return Ok(None);
        };
        let err = |reason: String| ConvertError::Tensor {
            path: src.file_path(meta.file).to_path_buf(),
            tensor: meta.name.clone(),
            reason,
        };
        let want = Whitener::dim_for(stats.axis, m, n);
        if stats.dim != want || meta.shape.len() != 2 {
            return Err(err(format!(
                "the calibration statistics are {d}×{d} on input axis {axis}, but the weight \
                 is {shape:?} (needs {want}×{want}): a calibration file of another model?",
                d = stats.dim,
                axis = stats.axis.number(),
                shape = meta.shape,
            )));
        }
        Whitener::new(&stats, self.config.damping)
            .map(Some)
            .map_err(err)
    }

    /// Reads the statistics of weight `name` (`None`: the file has none for it), checking
    /// they are finite, symmetric and have a non-negative diagonal.
    pub fn stats(&self, name: &str) -> Result<Option<InputStats>> {
        let Some(ws) = self.weights.get(name) else {
            return Ok(None);
        };
        let t = &self.source.tensors()[ws.tensor];
        let dim = t.shape[0];
        let g = self.source.read_float(ws.tensor)?.to_f64().into_owned();
        let err = |reason: String| ConvertError::Tensor {
            path: self.path.clone(),
            tensor: t.name.clone(),
            reason,
        };
        if let Some(i) = g.iter().position(|x| !x.is_finite()) {
            return Err(err(format!("non-finite value {} at flat index {i}", g[i])));
        }
        let max_diag = (0..dim).map(|i| g[i * dim + i]).fold(0.0f64, f64::max);
        for i in 0..dim {
            if g[i * dim + i] < 0.0 {
                return Err(err(format!(
                    "diagonal entry {i} is negative ({}): not a second moment",
                    g[i * dim + i]
                )));
            }
            for j in 0..i {
                // Stored in f32 from an f64 sum, G is symmetric to f32 rounding at most.
                let (a, b) = (g[i * dim + j], g[j * dim + i]);
                if (a - b).abs() > 1e-5 * max_diag {
                    return Err(err(format!(
                        "not symmetric: [{i}, {j}] = {a} but [{j}, {i}] = {b}"
                    )));
                }
            }
        }
        Ok(Some(InputStats {
            g,
            dim,
            axis: ws.axis,
        }))
    }
}

fn file_sha256(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f =
        cersa_loader::regular::open_regular(path).map_err(|e| ConvertError::io(path, "open", e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = f
            .read(&mut buf)
            .map_err(|e| ConvertError::io(path, "read", e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
    }
    Ok(cersa_loader::writer::hex(&h.finalize()))
}
