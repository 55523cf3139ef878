"""From a checkpoint to answers: batch-embed archives, build and version the index, re-index, search, result sheets."""
