# 003 "Inference", 2. Prepare your model (dense model). Fixes: none. `model` and `torch` come from the test's prelude; the placeholder `/your/model/dir/` is the test's directory. TorchServe change (not a typo): `.pth` -> `.pt` (TorchServe 0.12's BaseHandler loads TorchScript only from a .pt file: 'No model weights could be loaded').
jit_model = torch.jit.script(model)
jit_model.save('/your/model/dir/deepctr_v0.pt')
