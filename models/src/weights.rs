//! Opening a checkpoint file as a `VarBuilder`: safetensors (read tensor by tensor) or a PyTorch
//! zip pickle; legacy `torch.save` files are recognised and refused with the fix.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// The first of `names` that exists in `dir`, or an error listing what was looked for.
pub(crate) fn find_file(dir: &Path, names: &[&str]) -> Result<PathBuf> {
    if !dir.is_dir() {
        return Err(Error::Io {
            path: dir.to_path_buf(),
            cause: std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
        });
    }
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Io {
            path: dir.to_path_buf(),
            cause: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("model folder has none of {}", names.join(", ")),
            ),
        })
}

/// Reads and parses a JSON config file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|cause| Error::Io {
        path: path.to_path_buf(),
        cause,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))
}

/// A `VarBuilder` over one checkpoint file, converting every tensor to `dtype` on `device`.
///
/// Safetensors files (by extension or by content) are read tensor by tensor ([`SafetensorsFile`]);
/// anything else is read as a PyTorch zip pickle, taking the state dict under `state_key` (e.g.
/// `"model"` for `{"model": state_dict}`) when the file has one. Legacy (non-zip) `torch.save`
/// files and plain pickles are recognised and refused with the one line of Python that converts
/// them.
pub(crate) fn var_builder(
    path: &Path,
    state_key: Option<&str>,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let wrap = |cause| Error::Weights {
        path: path.to_path_buf(),
        cause,
    };
    let format = sniff(path)?;
    if path.extension().is_some_and(|e| e == "safetensors") || format == Format::Safetensors {
        let file = SafetensorsFile::open(path)?;
        return Ok(VarBuilder::from_backend(
            Box::new(file),
            dtype,
            device.clone(),
        ));
    }
    if let Some(msg) = format.refusal(path) {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        });
    }
    let Some(key) = state_key else {
        return VarBuilder::from_pth(path, dtype, device).map_err(wrap);
    };
    // A plain state dict is accepted too: users often re-save `ckpt["model"]` on its own.
    match candle_core::pickle::PthTensors::new(path, Some(key)) {
        Ok(t) if !t.tensor_infos().is_empty() => {
            Ok(VarBuilder::from_backend(Box::new(t), dtype, device.clone()))
        }
        _ => VarBuilder::from_pth(path, dtype, device).map_err(wrap),
    }
}

/// What a checkpoint file is, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// A zip archive: `torch.save` since PyTorch 1.6.
    Zip,
    /// A safetensors file: a little-endian u64 header length, then a JSON object.
    Safetensors,
    /// `torch.save(..., _use_new_zipfile_serialization=False)` or PyTorch < 1.6: a pickle
    /// stream that starts with torch's legacy magic number.
    LegacyTorch,
    /// Some other pickle stream (e.g. `pickle.dump` of a state dict).
    Pickle,
    /// Too short to be a checkpoint.
    Empty,
    /// Anything else: left to the zip reader, whose error is then reported.
    Unknown,
}

/// torch's legacy serialization: pickle protocol 2 (`0x80 0x02`), then the magic number
/// `0x1950a86a20f9469cfc6c` as a 10-byte pickled long (`0x8a 0x0a`, little-endian).
const LEGACY_TORCH_MAGIC: [u8; 14] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

/// Reads the first bytes of `path` and says what kind of file it is.
pub(crate) fn sniff(path: &Path) -> Result<Format> {
    let io = |cause| Error::Io {
        path: path.to_path_buf(),
        cause,
    };
    let mut head = [0u8; 16];
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]).map_err(io)? {
            0 => break,
            k => n += k,
        }
    }
    let head = &head[..n];
    Ok(if head.len() < 9 {
        Format::Empty
    } else if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Format::Zip
    } else if head.starts_with(&LEGACY_TORCH_MAGIC) {
        Format::LegacyTorch
    } else if head[0] == 0x80 && (2..=5).contains(&head[1]) {
        Format::Pickle
    } else if head[8] == b'{' && u64::from_le_bytes(head[..8].try_into().unwrap_or_default()) > 1 {
        Format::Safetensors
    } else {
        Format::Unknown
    })
}

impl Format {
    /// Why a file of this kind cannot be loaded, and how to fix it; `None` when it can be tried.
    fn refusal(self, path: &Path) -> Option<String> {
        let new = path.with_extension("zip.pth");
        let convert = format!(
            "convert it once with: python -c \"import torch; torch.save(torch.load('{}', \
             map_location='cpu', weights_only=False), '{}', _use_new_zipfile_serialization=True)\"",
            path.display(),
            new.display()
        );
        match self {
            Format::LegacyTorch => Some(format!(
                "a legacy (non-zip) torch.save checkpoint (PyTorch < 1.6 or \
                 _use_new_zipfile_serialization=False), which gigapath does not read; {convert} \
                 and use the new file (or save it as model.safetensors)"
            )),
            Format::Pickle => Some(format!(
                "a plain Python pickle, not a torch.save zip archive; {convert}"
            )),
            Format::Empty => Some("the file is empty or truncated (under 9 bytes)".into()),
            Format::Zip | Format::Safetensors | Format::Unknown => None,
        }
    }
}

/// One tensor of a safetensors header.
#[derive(Debug, Clone, serde::Deserialize)]
struct TensorEntry {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// A safetensors file read tensor by tensor with positional reads.
///
/// candle's memory-mapped loader copies every tensor out of the mapping, and the mapped pages a
/// load touches stay resident until the mapping is dropped at the end of the load: the peak RSS
/// was twice the file (8.9 GB for the 4.5 GB tile encoder). Here each tensor is read straight into
/// the buffer the tensor keeps (the file's pages stay in the page cache, not in the process), so
/// the peak is the model plus one tensor in flight.
pub(crate) struct SafetensorsFile {
    path: PathBuf,
    file: std::fs::File,
    /// Offset of the data section (8 + header length).
    data_start: u64,
    tensors: HashMap<String, TensorEntry>,
}

impl SafetensorsFile {
    /// Opens `path` and checks its header against the file's length.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let io = |cause| Error::Io {
            path: path.to_path_buf(),
            cause,
        };
        let bad = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!("not a valid safetensors file: {msg}"),
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|_| bad("shorter than its 8-byte header length".into()))?;
        let n = u64::from_le_bytes(n);
        if n > 100 << 20 || 8 + n > len {
            return Err(bad(format!(
                "header length {n} does not fit the {len}-byte file"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(io)?;
        let mut raw: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
        raw.remove("__metadata__");
        let data_start = 8 + n;
        let mut tensors = HashMap::with_capacity(raw.len());
        for (name, v) in raw {
            let e: TensorEntry =
                serde_json::from_value(v).map_err(|e| bad(format!("tensor {name}: {e}")))?;
            let dtype =
                DType::try_from(e.dtype).map_err(|err| bad(format!("tensor {name}: {err}")))?;
            let (start, end) = e.data_offsets;
            let want = e.shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
            if end < start || end - start != want || data_start + end > len {
                return Err(bad(format!(
                    "tensor {name} ({:?} {:?}) has data offsets [{start}, {end}] that do not fit \
                     its size or the {len}-byte file (truncated download?)",
                    e.dtype, e.shape
                )));
            }
            tensors.insert(name, e);
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            data_start,
            tensors,
        })
    }

    /// Reads one tensor in its stored dtype, then converts it to `dtype` on `dev`.
    fn read(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })?;
        let stored = DType::try_from(e.dtype)?;
        let (start, end) = e.data_offsets;
        let offset = self.data_start + start;
        let t = match stored {
            DType::F32 => self.read_into::<f32>(name, offset, &e.shape, dev)?,
            DType::F16 => self.read_into::<half::f16>(name, offset, &e.shape, dev)?,
            DType::BF16 => self.read_into::<half::bf16>(name, offset, &e.shape, dev)?,
            _ => {
                let mut bytes = vec![0u8; (end - start) as usize];
                self.read_at(name, &mut bytes, offset)?;
                Tensor::from_raw_buffer(&bytes, stored, &e.shape, dev)?
            }
        };
        t.to_dtype(dtype)
    }

    fn read_at(&self, name: &str, buf: &mut [u8], offset: u64) -> candle_core::Result<()> {
        read_exact_at(&self.file, buf, offset).map_err(|err| {
            candle_core::Error::Msg(format!(
                "reading tensor {name} of {}: {err}",
                self.path.display()
            ))
        })
    }

    /// Reads a little-endian tensor straight into the vector the tensor keeps (no staging copy,
    /// which the allocator would hold on to after the load).
    fn read_into<T: candle_core::WithDType>(
        &self,
        name: &str,
        offset: u64,
        shape: &[usize],
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut values = vec![T::zero(); n];
        if cfg!(target_endian = "little") {
            // SAFETY: f32 / f16 / bf16 are plain bit patterns (every byte sequence is a valid
            // value), the slice covers exactly the vector's initialised elements, and the vector
            // outlives it.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(
                    values.as_mut_ptr().cast::<u8>(),
                    n * std::mem::size_of::<T>(),
                )
            };
            self.read_at(name, bytes, offset)?;
            return Tensor::from_vec(values, shape, dev);
        }
        let mut bytes = vec![0u8; n * std::mem::size_of::<T>()];
        self.read_at(name, &mut bytes, offset)?;
        Tensor::from_raw_buffer(&bytes, T::DTYPE, shape, dev)
    }
}

#[cfg(unix)]
fn read_exact_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(not(unix))]
fn read_exact_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

impl SimpleBackend for SafetensorsFile {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(e) = self.tensors.get(name) {
            if e.shape != s.dims() {
                return Err(candle_core::Error::UnexpectedShape {
                    msg: format!("shape mismatch for {name}"),
                    expected: s,
                    got: e.shape.clone().into(),
                }
                .bt());
            }
        }
        self.read(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
