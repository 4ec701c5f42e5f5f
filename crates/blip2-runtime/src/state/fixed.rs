//! Decode steps at fixed addresses: how a CUDA-target OPT export runs its steps when the
//! language model's session captures CUDA graphs (a profile's `cuda_graph = true`).
//!
//! ONNX Runtime's CUDA provider can record a run as a CUDA graph and replay it later: one
//! launch for the whole step instead of several hundred kernels sent from the host. A
//! replay reads and writes the device addresses the capture saw, and the host values it
//! read then (`total_sequence_length`, top-k's K). So every decode step here binds the
//! same tensors:
//! - input buffers on the device (ids, positions, `seqlens_k`), written before each step;
//! - `total_sequence_length` fixed at the buffers' length (GroupQueryAttention reads each
//!   row's length from `seqlens_k`), and one `top_k` per candidate count;
//! - every output into a buffer of its own, the KV buffers bound as past and present.
//!
//! A captured graph is named by its `gpu_graph_id`. Each set of buffers has ids of its
//! own, one per candidate count (rows that move, beams or newcomers, are copied within
//! the set's KV buffers, which never move), so no graph ever replays against memory it
//! was not captured with. A
//! finished request gives its buffers back to the model's [`StepPool`], and the next
//! request of the same shape takes them, captured graphs included; ids are never reused.
//! The prefill and the row copies run uncaptured (`gpu_graph_id` -1): their shapes and
//! buffers change from call to call.
//!
//! Everything but the capture itself runs the same way on any provider: on the CPU the
//! "device" buffers are host memory, which is how the tests check this path.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use std::path::Path;

use blip2_core::{io, Family, Manifest, Target};
use ndarray::{Array2, ArrayD};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, RunOptions, Session};
use ort::value::{
    DynTensor, DynValue, PrimitiveTensorElementType, Tensor, TensorElementType, TensorRefMut,
};

use crate::error::{ort_err, RuntimeError};
use crate::generation::{StepOutput, Want};
use crate::kv_cache::{host_copy, KvCache, KvSpec, GPU_GRAPH_ID};
use crate::state::packed::{bind_input_in_place, Packed};

/// Buffer lengths are rounded up to a multiple of this, so that requests of nearby
/// lengths share buffers and captured graphs.
pub const CAPACITY_STEP: usize = 64;
/// Idle buffer sets the pool keeps; the least recently used beyond this are freed.
pub const IDLE_SETS: usize = 4;
/// KV bytes the idle sets may hold together (the last set given back is always kept):
/// an opt-2.7b set at batch 32 and 128 positions holds 1.3 GB per KV set.
pub const IDLE_KV_BYTES: usize = 2 << 30;

/// Graph ids: unique in the process, so a graph captured on freed buffers is never
/// replayed. 0 is ONNX Runtime's id for runs that name none; these start at 1.
static NEXT_GRAPH_ID: AtomicI32 = AtomicI32::new(1);
static NEXT_SET: AtomicU64 = AtomicU64::new(1);

/// The shapes and dtypes of an export's decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepShape {
    pub kv: KvSpec,
    pub hidden: usize,
    pub vocab: usize,
    /// Whether the graph has the `top_logits` output.
    pub top_logits: bool,
}

/// Buffer sets of finished requests, for the next request of the same shape.
pub struct StepPool {
    idle: Vec<StepBuffers>,
    max_sets: usize,
    max_kv_bytes: usize,
    /// Graph ids of sets freed since the last [`StepPool::release_captured`]: their
    /// captured graphs name memory that is gone.
    freed_graphs: Vec<i32>,
    /// Every graph id handed to ONNX Runtime for release (tests).
    #[cfg(any(test, feature = "test-support"))]
    released: Vec<i32>,
}

impl Default for StepPool {
    fn default() -> Self {
        Self::with_limits(IDLE_SETS, IDLE_KV_BYTES)
    }
}

impl StepPool {
    /// A pool that keeps at most `max_sets` idle sets holding at most `max_kv_bytes` of
    /// KV buffers together (the defaults are [`IDLE_SETS`] and [`IDLE_KV_BYTES`]).
    pub fn with_limits(max_sets: usize, max_kv_bytes: usize) -> Self {
        Self {
            idle: Vec::new(),
            max_sets,
            max_kv_bytes,
            freed_graphs: Vec::new(),
            #[cfg(any(test, feature = "test-support"))]
            released: Vec::new(),
        }
    }

    /// Idle buffers for `rows` rows of `capacity` positions, or new ones.
    pub fn take(
        &mut self,
        shape: StepShape,
        rows: usize,
        capacity: usize,
        allocator: &Allocator,
    ) -> Result<StepBuffers, RuntimeError> {
        match self
            .idle
            .iter()
            .position(|b| b.shape == shape && b.rows == rows && b.capacity == capacity)
        {
            Some(i) => Ok(self.idle.remove(i)),
            None => StepBuffers::allocate(shape, rows, capacity, allocator),
        }
    }

    /// Keeps `b` for a later request; frees the oldest idle sets beyond the pool's
    /// limits (never `b` itself), and notes their graph ids for
    /// [`StepPool::release_captured`].
    pub fn put(&mut self, b: StepBuffers) {
        self.idle.push(b);
        while self.idle.len() > 1
            && (self.idle.len() > self.max_sets
                || self.idle.iter().map(StepBuffers::kv_bytes).sum::<usize>() > self.max_kv_bytes)
        {
            let freed = self.idle.remove(0);
            self.freed_graphs.extend(freed.graph_ids());
        }
    }

    /// Asks `session` (the language model's) to release the CUDA graphs it captured on
    /// the sets freed since the last call (`SessionReleaseCapturedGraph`, ONNX Runtime
    /// 1.27 and later), so graph memory stays bounded by the pool's limits. A session
    /// that captured nothing under an id (any provider but CUDA with `cuda_graph`)
    /// answers with an error, which is not one: it is ignored.
    pub fn release_captured(&mut self, session: &mut Session) {
        use ort::AsPointer;
        for id in self.freed_graphs.drain(..) {
            // SAFETY: `session` is a live session; the status returned is ours to free.
            unsafe {
                let status = (ort::api().SessionReleaseCapturedGraph)(session.ptr().cast_mut(), id);
                if !status.0.is_null() {
                    (ort::api().ReleaseStatus)(status.0);
                }
            }
            #[cfg(any(test, feature = "test-support"))]
            self.released.push(id);
        }
    }

    #[cfg(any(test, feature = "test-support"))]
    /// The graph ids of the idle sets (tests).
    pub fn idle_graph_ids(&self) -> Vec<i32> {
        self.idle.iter().flat_map(StepBuffers::graph_ids).collect()
    }

    #[cfg(any(test, feature = "test-support"))]
    /// The graph ids given to ONNX Runtime for release so far (tests).
    pub fn released_graphs(&self) -> &[i32] {
        &self.released
    }

    #[cfg(any(test, feature = "test-support"))]
    /// How many idle sets it holds (tests).
    pub fn idle(&self) -> usize {
        self.idle.len()
    }

    #[cfg(any(test, feature = "test-support"))]
    /// The idle sets' numbers, oldest first (tests).
    pub fn idle_ids(&self) -> Vec<u64> {
        self.idle.iter().map(StepBuffers::id).collect()
    }
}

/// Whether the export described by `m` (in `dir`) can run its decode steps on fixed
/// buffers: an OPT export made with `--target cuda` (GroupQueryAttention over static
/// buffers, token selection in the graph) that has its `kv_reorder` graph. Flan-T5's
/// decoder reads its position on the host, so a captured step could not move on.
pub fn check_export(m: &Manifest, dir: &Path) -> Result<(), RuntimeError> {
    if m.family != Family::Opt || m.target != Target::Cuda {
        return Err(RuntimeError::Unsupported(format!(
            "{}: fixed decode-step buffers (cuda_graph = true) need an OPT export made with --target cuda; \
             this one is a {} {} export",
            dir.display(),
            m.family,
            if m.target == Target::Cuda { "--target cuda" } else { "portable" }
        )));
    }
    if m.graphs.kv_reorder.is_none() {
        return Err(RuntimeError::Unsupported(format!(
            "{}: this CUDA-target export has no kv_reorder graph; export it again",
            dir.display()
        )));
    }
    Ok(())
}

/// A KV buffer length for `needed` positions under the pool: rounded up to
/// [`CAPACITY_STEP`].
pub fn pooled_capacity(needed: usize) -> usize {
    needed.div_ceil(CAPACITY_STEP).max(1) * CAPACITY_STEP
}

/// A step bound once and run again and again: its binding, and the run options naming
/// its graph.
struct Bound {
    binding: IoBinding,
    options: RunOptions,
    graph_id: i32,
    /// The input views bound in place (the binding refers to them, not holds them).
    _inputs: [TensorRefMut<'static, i64>; 2],
    _seqlens: TensorRefMut<'static, i32>,
}

/// The outputs that depend on top-k's K, in one block ([`OUT_NEXT`] and the rest), and
/// the binding that uses them.
struct TopK {
    k: usize,
    top_k: DynValue,
    out: Packed,
    bound: Option<Bound>,
}

/// The parts of the input block.
const IN_IDS: usize = 0;
const IN_POSITIONS: usize = 1;
const IN_SEQLENS: usize = 2;
/// The parts of an output block: `next_token`, `top_ids`, `top_logprobs`, `top_logits`.
const OUT_NEXT: usize = 0;
const OUT_IDS: usize = 1;
const OUT_LOGPROBS: usize = 2;
const OUT_LOGITS: usize = 3;

/// Copies between the host and the buffers' device that a set has made (a statistic: on
/// the CPU the "copies" are reads and writes of host memory in place).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transfers {
    /// Decode steps run.
    pub steps: u64,
    /// Host-to-device writes.
    pub writes: u64,
    /// Device-to-host reads.
    pub reads: u64,
}

/// One request's decode-step tensors, all at fixed addresses.
pub struct StepBuffers {
    shape: StepShape,
    id: u64,
    rows: usize,
    capacity: usize,
    /// The KV buffers, written in place (rows move within them; see
    /// [`crate::state::opt_static`]).
    kv: KvCache,
    /// `input_ids`, `position_ids` and `seqlens_k`, written with one copy a step.
    inputs: Packed,
    image_embeds: DynTensor,
    total: DynValue,
    logits: DynTensor,
    tops: Vec<TopK>,
    /// The top-k buffers the last step ran with.
    last: Option<usize>,
    transfers: Transfers,
}

fn alloc(
    allocator: &Allocator,
    elem: TensorElementType,
    shape: &[usize],
) -> Result<DynTensor, RuntimeError> {
    DynTensor::new(allocator, elem, shape.to_vec())
        .map_err(ort_err("allocating the decode step's buffers"))
}

impl StepBuffers {
    fn allocate(
        shape: StepShape,
        rows: usize,
        capacity: usize,
        allocator: &Allocator,
    ) -> Result<Self, RuntimeError> {
        use TensorElementType::{Float16, Float32, Int32, Int64};
        let embeds = if shape.kv.fp16 { Float16 } else { Float32 };
        Ok(Self {
            shape,
            id: NEXT_SET.fetch_add(1, Ordering::Relaxed),
            rows,
            capacity,
            kv: KvCache::allocate(shape.kv, rows, capacity, allocator)?,
            inputs: Packed::allocate(
                allocator,
                &[(Int64, vec![rows, 1]), (Int64, vec![rows, 1]), (Int32, vec![rows])],
            )?,
            image_embeds: alloc(allocator, embeds, &[rows, 0, shape.hidden])?,
            total: Tensor::from_array(ndarray::arr0(capacity as i32))
                .map_err(ort_err("total_sequence_length"))?
                .into_dyn(),
            logits: alloc(allocator, Float32, &[rows, 1, shape.vocab])?,
            // K = 1 (greedy steps and steps that want the logits) from the start.
            tops: vec![Self::top_buffers(shape, rows, 1, allocator)?],
            last: None,
            transfers: Transfers::default(),
        })
    }

    /// The set's number (a request that reuses a set has the same one).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The graph ids its steps have run under (one per candidate count).
    pub fn graph_ids(&self) -> Vec<i32> {
        self.tops.iter().filter_map(|t| t.bound.as_ref().map(|b| b.graph_id)).collect()
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn shape(&self) -> StepShape {
        self.shape
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of its KV buffers.
    pub fn kv_bytes(&self) -> usize {
        let spec = self.shape.kv;
        2 * spec.layers
            * self.rows
            * spec.heads
            * self.capacity
            * spec.head_dim
            * if spec.fp16 { 2 } else { 4 }
    }

    /// The KV buffers.
    pub fn kv(&self) -> &KvCache {
        &self.kv
    }

    pub fn kv_mut(&mut self) -> &mut KvCache {
        &mut self.kv
    }

    /// Writes a step's inputs into the input buffers: each row's token, its position
    /// (`lens[r]`, the tokens it holds) and its length after the step minus one.
    /// One copy moves all three.
    pub fn write_step(&mut self, tokens: &[i64], lens: &[usize]) -> Result<(), RuntimeError> {
        if tokens.len() != self.rows || lens.len() != self.rows {
            return Err(RuntimeError::Input(format!(
                "a decode step of {} rows on buffers of {}",
                tokens.len(),
                self.rows
            )));
        }
        self.inputs.write(|b| {
            b.set(IN_IDS, tokens.iter().copied());
            b.set(IN_POSITIONS, lens.iter().map(|&n| n as i64));
            b.set(IN_SEQLENS, lens.iter().map(|&n| n as i32));
        })?;
        self.transfers.writes += 1;
        Ok(())
    }

    /// The copies this set has made, and its steps.
    pub fn transfers(&self) -> Transfers {
        self.transfers
    }

    /// Runs the step on `session` with `k` candidates (1 when only the logits or the
    /// argmax are wanted), binding the buffers the first time this K runs;
    /// returns the graph id it ran under. `allocator` is the model's, for the buffers of
    /// a K not seen before.
    pub fn run(
        &mut self,
        session: &mut Session,
        k: usize,
        allocator: &Allocator,
    ) -> Result<i32, RuntimeError> {
        let t = match self.tops.iter().position(|t| t.k == k) {
            Some(t) => t,
            None => {
                let top = Self::top_buffers(self.shape, self.rows, k, allocator)?;
                self.tops.push(top);
                self.tops.len() - 1
            }
        };
        if self.tops[t].bound.is_none() {
            let bound = self.bind(session, t)?;
            self.tops[t].bound = Some(bound);
        }
        let bound = self.tops[t].bound.as_ref().expect("bound above");
        self.last = Some(t);
        self.transfers.steps += 1;
        session
            .run_binding_with_options(&bound.binding, &bound.options)
            .map_err(ort_err("language model (decode step)"))?;
        Ok(bound.graph_id)
    }

    /// The output block for `k` candidates.
    fn top_buffers(
        step: StepShape,
        rows: usize,
        k: usize,
        allocator: &Allocator,
    ) -> Result<TopK, RuntimeError> {
        use TensorElementType::{Float32, Int64};
        let shape = vec![rows, k];
        let mut parts = vec![(Int64, vec![rows]), (Int64, shape.clone()), (Float32, shape.clone())];
        if step.top_logits {
            parts.push((Float32, shape));
        }
        Ok(TopK {
            k,
            top_k: super::top_k_value(k)?,
            out: Packed::allocate(allocator, &parts)?,
            bound: None,
        })
    }

    fn bind(&mut self, session: &mut Session, t: usize) -> Result<Bound, RuntimeError> {
        let mut binding =
            session.create_binding().map_err(ort_err("decode step: creating an IO binding"))?;
        // A static cache binds its own tensors as outputs; the memory is not used.
        let memory =
            MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)
                .map_err(ort_err("host memory info"))?;
        let cache = &mut self.kv;
        let top = &mut self.tops[t];
        let inputs = &self.inputs;
        let (ids, positions, seqlens) = (
            inputs.view::<i64>(IN_IDS)?,
            inputs.view::<i64>(IN_POSITIONS)?,
            inputs.view::<i32>(IN_SEQLENS)?,
        );
        let out = &top.out;
        let (next, top_ids, logprobs) =
            (out.view::<i64>(OUT_NEXT)?, out.view::<i64>(OUT_IDS)?, out.view::<f32>(OUT_LOGPROBS)?);
        let top_logits =
            if self.shape.top_logits { Some(out.view::<f32>(OUT_LOGITS)?) } else { None };
        bind_input_in_place(&mut binding, io::INPUT_IDS, &ids)?;
        bind_input_in_place(&mut binding, io::POSITION_IDS, &positions)?;
        bind_input_in_place(&mut binding, io::SEQLENS_K, &seqlens)?;
        (|| -> Result<(), ort::Error> {
            binding.bind_input(io::IMAGE_EMBEDS, &self.image_embeds)?;
            binding.bind_input(io::TOTAL_SEQUENCE_LENGTH, &self.total)?;
            binding.bind_input(io::TOP_K, &top.top_k)?;
            cache.bind(&mut binding, &memory)?;
            binding.bind_output(io::LOGITS, &mut self.logits)?;
            binding.bind_output(io::NEXT_TOKEN, next)?;
            binding.bind_output(io::TOP_IDS, top_ids)?;
            binding.bind_output(io::TOP_LOGPROBS, logprobs)?;
            if let Some(l) = top_logits {
                binding.bind_output(io::TOP_LOGITS, l)?;
            }
            Ok(())
        })()
        .map_err(ort_err("decode step: binding the fixed buffers"))?;
        let graph_id = NEXT_GRAPH_ID.fetch_add(1, Ordering::Relaxed);
        let mut options = RunOptions::new().map_err(ort_err("creating run options"))?;
        options.set(GPU_GRAPH_ID, graph_id.to_string()).map_err(ort_err("setting gpu_graph_id"))?;
        Ok(Bound { binding, options, graph_id, _inputs: [ids, positions], _seqlens: seqlens })
    }

    /// What `want` asks of the last step, from the output buffers: the last step's
    /// output block, read with one copy when it lies on a device (the logits, when asked
    /// for, with one more).
    pub fn answer(&mut self, want: Want) -> Result<StepOutput, RuntimeError> {
        if want == Want::Logits {
            return Ok(StepOutput::Logits(self.logits()?));
        }
        let rows = self.rows;
        let t = self.last.ok_or_else(|| RuntimeError::MissingOutput("a decode step".into()))?;
        let top = &mut self.tops[t];
        let k = top.k;
        match want {
            Want::TopLogProbs(w) | Want::TopLogits(w) if w != k => {
                return Err(RuntimeError::MissingOutput(format!(
                    "top-{w} candidates (the last step kept {k})"
                )))
            }
            Want::TopLogits(_) if !self.shape.top_logits => {
                return Err(RuntimeError::MissingOutput(io::TOP_LOGITS.into()))
            }
            _ => {}
        }
        let bytes = top.out.read()?;
        self.transfers.reads += 1;
        let grid = |v: Vec<f32>| Array2::from_shape_vec((rows, k), v).expect("rows x k values");
        let ids =
            || Array2::from_shape_vec((rows, k), bytes.get::<i64>(OUT_IDS)).expect("rows x k");
        Ok(match want {
            Want::Argmax => StepOutput::Argmax(bytes.get::<i64>(OUT_NEXT)),
            Want::TopLogProbs(_) => {
                StepOutput::TopLogProbs { logprobs: grid(bytes.get(OUT_LOGPROBS)), ids: ids() }
            }
            Want::TopLogits(_) => {
                StepOutput::TopLogits { logits: grid(bytes.get(OUT_LOGITS)), ids: ids() }
            }
            Want::Logits => unreachable!("answered above"),
        })
    }

    /// The last step's logits, `[rows, vocab]`.
    pub fn logits(&mut self) -> Result<Array2<f32>, RuntimeError> {
        let a = host::<f32>(&self.logits)?;
        self.transfers.reads += 1;
        a.into_shape_with_order((self.rows, self.shape.vocab))
            .map_err(|_| RuntimeError::MissingOutput("logits of shape [rows, 1, vocab]".into()))
    }

    #[cfg(any(test, feature = "test-support"))]
    /// Where every bound tensor's data lies (tests: they never move).
    pub fn addresses(&self) -> Vec<usize> {
        let mut a = vec![
            self.inputs.address(IN_IDS),
            self.inputs.address(IN_POSITIONS),
            self.inputs.address(IN_SEQLENS),
            self.logits.data_ptr() as usize,
        ];
        // The first top-k block's `next_token` (the blocks of other K never move either).
        a.extend(self.tops.first().map(|t| t.out.address(OUT_NEXT)));
        a.extend(self.kv().addresses());
        a
    }
}

/// A fixed tensor's contents in host memory.
fn host<T>(t: &DynTensor) -> Result<ArrayD<T>, RuntimeError>
where
    T: PrimitiveTensorElementType + Clone + 'static,
{
    let h = host_copy(t, "step output")?;
    Ok(h.as_ref()
        .unwrap_or(t)
        .try_extract_array::<T>()
        .map_err(ort_err("reading a step output"))?
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> StepShape {
        StepShape {
            kv: KvSpec { layers: 2, heads: 2, head_dim: 4, fp16: false },
            hidden: 8,
            vocab: 10,
            top_logits: true,
        }
    }

    #[test]
    fn the_pool_reuses_sets_of_one_shape_and_frees_the_oldest_beyond_its_limits() {
        crate::ort_env::init().unwrap();
        let alloc = Allocator::default();
        // One set of 1 row and 64 positions: 2 layers x 2 (key, value) x 2 heads x 64 x 4 x 4 bytes.
        let one = 2 * 2 * 2 * 64 * 4 * 4;
        let mut pool = StepPool::with_limits(3, 12 * one);
        let a = pool.take(shape(), 1, 64, &alloc).unwrap();
        assert_eq!(a.kv_bytes(), one);
        let id = a.id();
        pool.put(a);
        let again = pool.take(shape(), 1, 64, &alloc).unwrap();
        assert_eq!(again.id(), id, "the same shape takes the idle set");
        let other = pool.take(shape(), 1, 128, &alloc).unwrap();
        assert_ne!(other.id(), id, "another length is another set");
        pool.put(again);
        pool.put(other);
        // Three more (2, 3 and 4 units): the count limit (3) frees the oldest.
        let sets: Vec<StepBuffers> =
            (0..3).map(|r| pool.take(shape(), r + 2, 64, &alloc).unwrap()).collect();
        let ids: Vec<u64> = sets.iter().map(StepBuffers::id).collect();
        for s in sets {
            pool.put(s);
        }
        assert_eq!(pool.idle_ids(), ids, "only the newest three are kept");
        // Bytes: a set of 13 rows (13 units) alone exceeds the budget (12 units) but is
        // kept, as the last one given back; all older ones go.
        let big = pool.take(shape(), 13, 64, &alloc).unwrap();
        let big_id = big.id();
        pool.put(big);
        assert_eq!(pool.idle_ids(), [big_id]);
        // A small one beside it: together over the budget, so the big one goes.
        let small = pool.take(shape(), 1, 64, &alloc).unwrap();
        let small_id = small.id();
        pool.put(small);
        assert_eq!(pool.idle_ids(), [small_id]);
    }
}
