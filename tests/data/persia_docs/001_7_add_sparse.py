# 001 "Getting Started", Add sparse data. Fixes: `enumerate(batch_all_sparse_data)` -> `enumerate(np.stack(batch_all_sparse_data, axis=1))` (the loop is over categories, as its comment shows, and batch_all_sparse_data holds samples; the dense snippet stacks the same way); the docstring's sample lacks commas after `np.array([3])` (kept: it is a string).
"""
    In Kaggle Display Advertising Challenge dataset, every categories only lookup one sparse id in each sample. 
    sample below:

    batch_size = 5
    sparse_feature1 = [
        np.array([0]),
        np.array([1]),
        np.array([2]),
        np.array([3])
        np.array([5])
    ]

    sparse_feature2 = [
        np.array([2]),
        np.array([3]),
        np.array([4]),
        np.array([2])
        np.array([6])
    ]
"""
batch_sparse_category_data = []
for (idx, batch_sparse_data) in enumerate(np.stack(batch_all_sparse_data, axis=1)):
    category_name = f"sparse_feature{idx}"
    sparse_array = []
    for i in range(batch_size):
        sparse_array.append(batch_sparse_data[i:i+1])
    batch_sparse_category_data.append((category_name, sparse_array))
persia_batch_data.add_sparse(batch_sparse_category_data)
