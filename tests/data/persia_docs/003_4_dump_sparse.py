# 003 "Inference", 2. Prepare your model (sparse model). Fixes: none. `ctx` (a training context) comes from the test's prelude; the placeholder `/your/ceph_dir/or/hdfs_dir/` is the test's directory.
ctx.dump('/your/ceph_dir/or/hdfs_dir/')
