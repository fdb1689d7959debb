# 001 "Getting Started", Start training. Fixes: none. Skipped: runs PERSIA's DLRM example as a docker stack (docker, PERSIA's repository).
cd examples/DLRM/ && make run 
# run make stop to remove docker stack job
# make stop
