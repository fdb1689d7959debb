"""The in-memory embedding store (:mod:`.store`), its compiled kernels, memory helpers (huge
pages) and CPU placement."""
