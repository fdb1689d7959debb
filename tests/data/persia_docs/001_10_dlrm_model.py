# 001 "Getting Started", Define model. Fixes: `DLRM()` -> `DLRM(ln, sigmoid_layer)` (its __init__ takes both; `ln`, `sigmoid_layer` and `nn` come from the test's prelude, as examples/DLRM/model.py defines them).
from typing import List

import torch
class DLRM(nn.Module):
    def __init__(self, ln, sigmoid_layer):
        ...

    def forward(self, dense: List[torch.Tensor], sparse: List[torch.Tensor]):
        ...

model = DLRM(ln, sigmoid_layer)
