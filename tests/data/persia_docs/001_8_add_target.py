# 001 "Getting Started", Add target data. Fixes: `batch_target_data[i]` -> `batch_target_data[i:i+1]` (the target must be 2-D [batch, 1], as the text says; the sparse snippet slices the same way).
batch_target_data = np.array(batch_target_data, dtype=np.float32)
batch_target_data = np.stack([batch_target_data[i:i+1] for i in range(batch_size)]) 
persia_batch_data.add_target(batch_target_data) # can invoke multiple times for multi task training
