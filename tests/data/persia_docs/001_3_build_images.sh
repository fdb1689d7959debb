# 001 "Getting Started", Setup 3. Fixes: none. Skipped: builds PERSIA's docker images (docker, PERSIA's Makefile).
make build_all 
