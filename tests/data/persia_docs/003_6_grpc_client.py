# 003 "Inference", 4. Launch request to torchserve by grpc client. Fixes: none (the block, an excerpt of a function body indented by 4 spaces, is stored dedented). `np`, `PyPersiaBatchData`, `PersiaEmbeddingClientPyClass`, `infer` and `get_inference_stub` come from the test's prelude (TorchServe's example gRPC client, sending the bytes as the handler's `batch` input).
persia_backend = PersiaEmbeddingClientPyClass(0, [])

batch_size = 128
feature_dim = 32
denses = [np.random.rand(batch_size, feature_dim).astype(np.float32)]
sparse = []
for sparse_idx in range(3):
    sparse.append((
        f'feature_{sparse_idx}',
        [np.random.randint(10000000000, size=feature_dim).astype(np.uint64) for _ in range(batch_size)]
    ))

batch_data = PyPersiaBatchData()
batch_data.add_dense(denses)
batch_data.add_sparse(sparse)

model_input = persia_backend.batch_to_bytes(batch_data)
infer(get_inference_stub(), 'deepctr', model_input)
