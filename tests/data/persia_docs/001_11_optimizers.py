# 001 "Getting Started", Define optimizer. Fixes: none (the text's `perisa.sparse.optim` is prose). `model` comes from the test's prelude.
from torch.optim import SGD
from persia.sparse.optim import Adagrad

# DENSE parameters optimizer
dense_optimizer = SGD(model.parameters(), lr=0.1)
# Sparse embedding optimizer
sparse_optimizer = Adagrad(lr=1e-3)
