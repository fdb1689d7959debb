# 000 "Customize a PERSIA Job", Model Checkpointing. Fixes: none. `model`, `sparse_optimizer`, `dense_optimizer`, `device_id`, `embedding_config`, `checkpoint_dir` and `batch_idx` come from the test's prelude (the document's earlier snippets and text).
with TrainCtx(
    model=model,
    sparse_optimizer=sparse_optimizer,
    dense_optimizer=dense_optimizer,
    device_id=device_id,
    embedding_config=embedding_config,
) as ctx:
    ctx.load_checkpoint(checkpoint_dir)
    if batch_idx % 10000 == 0:
        ctx.dump_checkpoint(checkpoint_dir)
