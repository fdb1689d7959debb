# 001 "Getting Started", Setup 1. Fixes: none. Skipped: downloads the Kaggle dataset from figshare (needs the network).
cd examples/DLRM/data  
curl -L -o data.tar.gz https://ndownloader.figshare.com/files/10082655
# wget https://ndownloader.figshare.com/files/10082655 -o data.tar.gz
tar -zxvf data.tar.gz && rm -rf data.tar.gz
