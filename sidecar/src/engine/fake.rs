//! A deterministic [`Engine`] for tests of batching, admission and deadlines, without ONNX Runtime
//! or a model file (the `fake-engine` feature).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::{Engine, InferError};

/// A model that answers each image with its mean value (repeated `dim` times) after a fixed
/// time per batch, and counts what it ran.
#[derive(Debug, Clone)]
pub struct FakeEngine {
    /// Values per image in the input.
    pub tensor_len: usize,
    /// Embedding length.
    pub dim: usize,
    /// Time one batch takes, whatever its size.
    pub batch_time: Duration,
    /// Batches started (shared with the test that made the engine).
    pub entered: Arc<AtomicUsize>,
    /// Images run.
    pub images: Arc<AtomicUsize>,
    /// Sizes of the batches run, in order.
    pub sizes: Arc<parking_lot::Mutex<Vec<usize>>>,
}

impl FakeEngine {
    /// A fake for `tensor_len`-value inputs that takes `batch_time` a batch.
    pub fn new(tensor_len: usize, dim: usize, batch_time: Duration) -> Self {
        Self { tensor_len, dim, batch_time, entered: Arc::default(), images: Arc::default(), sizes: Arc::default() }
    }
}

impl Engine for FakeEngine {
    fn run(&mut self, batch: Vec<f32>, n: usize) -> Result<Vec<Vec<f32>>, InferError> {
        if batch.len() != n * self.tensor_len {
            return Err(InferError(format!("{} values for {n} images of {}", batch.len(), self.tensor_len)));
        }
        self.entered.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.batch_time);
        self.images.fetch_add(n, Ordering::SeqCst);
        self.sizes.lock().push(n);
        Ok(batch
            .chunks_exact(self.tensor_len.max(1))
            .map(|image| vec![image.iter().sum::<f32>() / image.len() as f32; self.dim])
            .collect())
    }

    fn warm_up(&mut self, _max_batch: usize) -> Result<(), InferError> {
        Ok(())
    }
}
