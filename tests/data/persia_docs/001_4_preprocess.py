# 001 "Getting Started", Data preprocess. Fixes: `denseline.split` -> `line.split`; `np.int32(line[0])` -> `np.int32(splitter[0])` and `line[14:]` -> `splitter[14:]` (the split fields, not the line's characters); `sample_sample` -> `sparse_sample`.
import numpy as np

"""
sample of train.txt
0       1       1       5       0       1382    4       15      2       181     1       2               2       68fd1e64      80e26c9b        fb936136        7b4723c4        25c83c98        7e0ccccf        de7995b8        1f89b562     a73ee510 a8cd5504        b2cb9c98        37c9c164        2824a5f6        1adce6ef        8ba8b39a        891b62e7     e5ba7672 f54016b9        21ddcdc9        b1252a9d        07b5194c                3a171ecb        c5c50484        e8b83407        9727dd16

"""
source_data = "train.txt"
batch_size = 5
batch_data = []

with open(source_data, "r") as file:
    for line in file:
        splitter = line.split("\t")
        target = np.int32(splitter[0])
        dense_sample = np.array(splitter[1:14], dtype=np.float32)
        sparse_sample = np.array(
            list(map(lambda x: int(x, 16), splitter[14:])), dtype=np.uint64
        ) 
        batch_data.append((dense_sample, sparse_sample, target))
        if len(batch_data) == batch_size:
            # process the below
            ...
