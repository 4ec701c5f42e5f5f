//! Small tensors packed into one allocation where the language model runs, so that one
//! copy moves them all.
//!
//! A copy between host and device through ort (`copy_into`) runs a one-node Identity
//! session and waits for the device: its cost is the call, not the bytes. A decode step
//! on fixed buffers ([`super::fixed`]) therefore writes its three inputs (token ids,
//! positions, `seqlens_k`) as one block and reads what the search wants (the chosen
//! tokens or the top-k candidates) as another: one host-to-device and one
//! device-to-host copy a step. The graph sees each part as a tensor of its own, a view
//! at its offset in the block.

use ort::memory::Allocator;
use ort::session::IoBinding;
use ort::value::{DynTensor, PrimitiveTensorElementType, Shape, TensorElementType, TensorRefMut};
use ort::AsPointer;

use crate::error::{ort_err, RuntimeError};

/// Parts start at multiples of this many bytes (the widest element).
const ALIGN: usize = 8;

/// One part: its element type, shape and byte offset in the block.
#[derive(Debug, Clone)]
struct Part {
    elem: TensorElementType,
    shape: Vec<usize>,
    offset: usize,
}

fn elem_size(e: TensorElementType) -> usize {
    match e {
        TensorElementType::Int64 => 8,
        TensorElementType::Int32 | TensorElementType::Float32 => 4,
        TensorElementType::Float16 => 2,
        _ => 1,
    }
}

/// A block of parts where the model runs, with a host copy for devices the host cannot
/// read.
pub struct Packed {
    mem: DynTensor,
    staging: Option<DynTensor>,
    parts: Vec<Part>,
    len: usize,
}

impl Packed {
    /// A block for `parts` (element type and shape each), allocated by `allocator`.
    pub fn allocate(
        allocator: &Allocator,
        parts: &[(TensorElementType, Vec<usize>)],
    ) -> Result<Self, RuntimeError> {
        let mut offset = 0;
        let parts: Vec<Part> = parts
            .iter()
            .map(|(elem, shape)| {
                let p = Part { elem: *elem, shape: shape.clone(), offset };
                let bytes = shape.iter().product::<usize>() * elem_size(*elem);
                offset += bytes.div_ceil(ALIGN) * ALIGN;
                p
            })
            .collect();
        let len = offset.max(ALIGN);
        let mem = DynTensor::new(allocator, TensorElementType::Uint8, vec![len])
            .map_err(ort_err("allocating the decode step's buffers"))?;
        let staging = if mem.memory_info().is_cpu_accessible() {
            None
        } else {
            Some(
                DynTensor::new(&Allocator::default(), TensorElementType::Uint8, vec![len])
                    .map_err(ort_err("allocating host memory for the decode step"))?,
            )
        };
        Ok(Self { mem, staging, parts, len })
    }

    /// Part `i` as a tensor of its own, for binding (input or output).
    ///
    /// The view borrows the block's memory without a lifetime: whoever binds it must
    /// keep the block alive as long as the binding (both live in one buffer set).
    pub fn view<T: PrimitiveTensorElementType + std::fmt::Debug>(
        &self,
        i: usize,
    ) -> Result<TensorRefMut<'static, T>, RuntimeError> {
        let p = &self.parts[i];
        if T::into_tensor_element_type() != p.elem {
            return Err(RuntimeError::Unsupported(format!(
                "packed part {i} holds {:?}, not {:?}",
                p.elem,
                T::into_tensor_element_type()
            )));
        }
        let info = self.mem.memory_info().clone();
        // SAFETY: the part lies inside the block (offsets come from the parts' sizes), and
        // the caller keeps the block alive while the view is bound.
        unsafe {
            let data = (self.mem.data_ptr() as *mut u8).add(p.offset).cast();
            TensorRefMut::from_raw(info, data, Shape::new(p.shape.iter().map(|&d| d as i64)))
        }
        .map_err(ort_err("a view of the decode step's buffers"))
    }

    /// Where part `i` lies.
    pub fn address(&self, i: usize) -> usize {
        self.mem.data_ptr() as usize + self.parts[i].offset
    }

    /// Fills the block on the host with `fill` (given the parts' bytes, part by part) and
    /// moves it where the model runs: one copy, or none when that is host memory.
    pub fn write(&mut self, fill: impl FnOnce(&mut Bytes<'_>)) -> Result<(), RuntimeError> {
        let len = self.len;
        let target = self.staging.as_mut().unwrap_or(&mut self.mem);
        // SAFETY: the tensor holds `len` bytes of host memory, not aliased meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts_mut(target.data_ptr_mut().cast(), len) };
        fill(&mut Bytes { bytes, parts: &self.parts });
        if let Some(s) = &self.staging {
            s.copy_into(&mut self.mem).map_err(ort_err("writing the decode step's inputs"))?;
        }
        Ok(())
    }

    /// The block's bytes on the host: one copy from the device, or none when the block
    /// is host memory.
    pub fn read(&mut self) -> Result<Bytes<'_>, RuntimeError> {
        let len = self.len;
        let source = match self.staging.as_mut() {
            Some(s) => {
                self.mem
                    .copy_into(&mut *s)
                    .map_err(ort_err("reading the decode step's outputs"))?;
                s
            }
            None => &mut self.mem,
        };
        // SAFETY: as in `write`.
        let bytes = unsafe { std::slice::from_raw_parts_mut(source.data_ptr_mut().cast(), len) };
        Ok(Bytes { bytes, parts: &self.parts })
    }
}

/// Binds `view` to the input `name` as it is, so the session reads the view's memory at
/// every run. (`IoBinding::bind_input` copies a tensor over borrowed memory at bind time,
/// which would freeze a fixed input at its first value.) The binding does not keep the
/// view alive: the caller holds it as long as the binding.
pub fn bind_input_in_place<T: PrimitiveTensorElementType + std::fmt::Debug>(
    binding: &mut IoBinding,
    name: &str,
    view: &TensorRefMut<'static, T>,
) -> Result<(), RuntimeError> {
    let cname = std::ffi::CString::new(name).expect("input names have no NUL");
    let api = ort::api();
    // SAFETY: the binding and the value are live ONNX Runtime objects; the status, when
    // one is returned, is read and released here.
    unsafe {
        let status = (api.BindInput)(binding.ptr_mut(), cname.as_ptr(), view.ptr());
        if !status.0.is_null() {
            let message = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0))
                .to_string_lossy()
                .into_owned();
            (api.ReleaseStatus)(status.0);
            return Err(RuntimeError::Input(format!("binding {name}: {message}")));
        }
    }
    Ok(())
}

/// A block's bytes on the host, part by part.
pub struct Bytes<'a> {
    bytes: &'a mut [u8],
    parts: &'a [Part],
}

/// Element types a part can be read or written as.
pub trait Element: Copy {
    const SIZE: usize;
    fn read(b: &[u8]) -> Self;
    fn write(self, b: &mut [u8]);
}

macro_rules! element {
    ($t:ty) => {
        impl Element for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn read(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b.try_into().expect("an element's bytes"))
            }
            fn write(self, b: &mut [u8]) {
                b.copy_from_slice(&self.to_le_bytes());
            }
        }
    };
}
element!(i64);
element!(i32);
element!(f32);

impl Bytes<'_> {
    fn range(&self, i: usize, size: usize) -> std::ops::Range<usize> {
        let p = &self.parts[i];
        debug_assert_eq!(elem_size(p.elem), size, "part {i} read as another element size");
        p.offset..p.offset + p.shape.iter().product::<usize>() * size
    }

    /// Part `i`'s values.
    pub fn get<T: Element>(&self, i: usize) -> Vec<T> {
        self.bytes[self.range(i, T::SIZE)].chunks_exact(T::SIZE).map(T::read).collect()
    }

    /// Sets part `i` to `values` (as many as it holds).
    pub fn set<T: Element>(&mut self, i: usize, values: impl IntoIterator<Item = T>) {
        let r = self.range(i, T::SIZE);
        for (v, b) in values.into_iter().zip(self.bytes[r].chunks_exact_mut(T::SIZE)) {
            v.write(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_keep_their_values_and_views_see_them() {
        crate::ort_env::init().unwrap();
        let a = Allocator::default();
        let mut p = Packed::allocate(
            &a,
            &[
                (TensorElementType::Int64, vec![3, 1]),
                (TensorElementType::Int32, vec![3]),
                (TensorElementType::Float32, vec![2, 2]),
            ],
        )
        .unwrap();
        p.write(|b| {
            b.set(0, [7i64, -8, 9]);
            b.set(1, [1i32, 2, 3]);
            b.set(2, [0.5f32, 1.5, 2.5, 3.5]);
        })
        .unwrap();
        let r = p.read().unwrap();
        assert_eq!(r.get::<i64>(0), [7, -8, 9]);
        assert_eq!(r.get::<i32>(1), [1, 2, 3]);
        assert_eq!(r.get::<f32>(2), [0.5, 1.5, 2.5, 3.5]);
        // The views are the parts: same values, each at its own aligned offset.
        let v = p.view::<i32>(1).unwrap();
        assert_eq!(
            v.try_extract_array::<i32>().unwrap().iter().copied().collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(p.address(1) - p.address(0), 24);
        assert_eq!(p.address(2) - p.address(1), 16);
        assert!(p.view::<f32>(0).is_err(), "a part is viewed as what it holds");
    }
}
