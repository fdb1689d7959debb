# 002 build notes, "build". Fixes: none. Skipped: installs into the running environment (`pip install build` and `pip install .` need the package index and would replace the shared editable install) and runs PERSIA's Rust binary persia.gencrd; building the wheel and installing it into a fresh environment is tests/test_packaging.py's.
python -m pip install build
python -m build
NATIVE=1 pip install .

persia.gencrd -h

