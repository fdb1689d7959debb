# 000 "Customize a PERSIA Job", Model Definition / Define DNN model. Fixes: none (`nn` comes from the test's prelude, `from torch import nn`, as the document's next snippet imports it).
from typing import List

import torch

class DNN(nn.Module):
    def forward(self, dense: torch.Tensor, sparse: List[torch.Tensor]):
        ...
