package kernels

// GraphCapturer is implemented by backends that can record the operations
// issued between BeginCapture and EndCapture and replay them as one unit (a
// CUDA graph), so that a decode step costs one launch instead of hundreds.
// Between the two calls the caller may only issue device operations: no
// Upload, UploadBatch, Download or Sample (they need the host), and every
// tensor the operations touch must stay allocated while the graph lives.
type GraphCapturer interface {
	BeginCapture() error
	EndCapture() (Graph, error)
}

// Graph is a recorded sequence of operations.
type Graph interface {
	// Launch replays the operations (asynchronously, in stream order).
	Launch() error
	Close() error
}

// BatchUpdater is implemented by backends whose uploaded batches can be
// rewritten in place, so that a captured step replays with the next
// positions, slots and block tables. The new batch must have the same
// number of tokens and sequences, no wider block tables, and contexts no
// longer than the batch the metadata was uploaded with.
type BatchUpdater interface {
	UpdateBatch(meta BatchMeta, b *Batch) error
}

// GraphBatcher is implemented by backends whose batch metadata can live in
// its own buffer for as long as a captured graph reads it (UploadBatch's
// buffers are recycled from step to step). A graph captured over such
// metadata replays later batches after BatchUpdater.UpdateBatch rewrites it.
type GraphBatcher interface {
	// NewBatchMeta uploads b into a buffer of its own; free it with
	// FreeBatchMeta once no graph reads it.
	NewBatchMeta(b *Batch) (BatchMeta, error)
	FreeBatchMeta(meta BatchMeta)
}
