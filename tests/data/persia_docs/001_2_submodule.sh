# 001 "Getting Started", Setup 2 (inline). Fixes: `git submodule init --udpate` -> `git submodule update --init`. Skipped: PERSIA's repository's persia-core submodule (ctrserve has none).
git submodule update --init
