# 001 "Getting Started", Add dense data. Fixes: none.
persia_batch_data = PyPersiaBatchData()
batch_dense_data = np.stack(batch_dense_data)

# add single dense
persia_batch_data.add_dense_f32(batch_dense_data)

# add a dense list
# dense_array_list = []
# dense_array_list.append(batch_dense_data)
# persia_batch_data.add_dense(dense_array_list)
