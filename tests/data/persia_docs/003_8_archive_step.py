# 003 "Inference", 6. update dense model to torch serve (archive every few steps). Fixes: none. `model`, `torch`, `subprocess`, `batch_idx`, `handler_path` and `mar_path` come from the test's prelude; the placeholder `/workspace/model/` is the test's directory. TorchServe change (not a typo): `.pth` -> `.pt` (TorchServe 0.12's BaseHandler loads TorchScript only from a .pt file: 'No model weights could be loaded').
model_path = f"/workspace/model/deepctr_step_{batch_idx}.pt"
jit_model = torch.jit.script(model)
jit_model.save(model_path)
subprocess.check_call(
    f"torch-model-archiver \
        --model-name deepctr \
        --version {batch_idx} \
        --serialized-file {model_path} \
        --handler {handler_path} \
        --export-path {mar_path} -f",
    shell=True
)
