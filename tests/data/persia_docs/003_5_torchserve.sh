# 003 "Inference", 3. Deploy torchserve and perisa servers. Fixes: none. The placeholder `/workspace/serve/model/` is the test's model store; TorchServe's ports come from TS_CONFIG_FILE.
torchserve --start --ncs --model-store /workspace/serve/model/ --models deepctr.mar
