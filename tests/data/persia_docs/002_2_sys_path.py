# 002 build notes, FAQ "No module named persia_core". Fixes: none. `sys` comes from the test's prelude (the text's `import sys`).
sys.path.append('/opt/anaconda3/lib/python3.11/site-packages/persia')
