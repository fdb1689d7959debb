# 001 "Getting Started", Persia data structure to store training data. Fixes: none.
from persia.prelude import PyPersiaBatchData

persia_batch_data = PyPersiaBatchData()
batch_dense_data, batch_all_sparse_data, batch_target_data = zip(*batch_data)
