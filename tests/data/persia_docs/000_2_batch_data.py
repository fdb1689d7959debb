# 000 "Customize a PERSIA Job", Customize Persia Batch Data. Fixes: `np.random.one` -> `np.ones` (numpy has no np.random.ones; the mock ids are ones); undefined `batch_sparse_data` -> `batch_categorical_data_item` (the list built just above). Size change (not a typo): `max_categorical_len = 65536` -> `64` (up to 65536 ids per sample x 1024 samples x 3 features is ~100M ids, 800 MB, too big for a test).
import numpy as np

from persia.prelude import PyPersiaBatchData

batch_data = PyPersiaBatchData()

# categorical name should be the same with the categorical name which 
# already defined in embedding_config.yml.
categorical_names = [
    "id",
    "age",
    "gender"
]

batch_size = 1024
dim = 256

batch_data.add_dense(np.ones((batch_size, dim), dtype=np.float32))

categorical_data_num = 3
max_categorical_len = 64

batch_categorical_data = []
for categorical_idx in range(categorical_data_num):
    batch_categorical_data_item = []
    for batch_idx in range(batch_size):
        cnt_categorical_len = np.random.randint(0, max_categorical_len)
        sample_data = np.ones((cnt_categorical_len), dtype=np.uint64)
        batch_categorical_data_item.append(sample_data)
    batch_categorical_data.append((categorical_names[categorical_idx], batch_categorical_data_item))

# add mock sparse data into PyPersiaBatchData 
batch_data.add_sparse(batch_categorical_data)
batch_data.add_target(np.ones((1024, 2), dtype=np.float32))
