# 003 "Inference", 6. update dense model to torch serve (register). Fixes: none. TorchServe change (not a typo): `'url': f"/workspace/model/..."` -> `f"file:///workspace/model/..."` (TorchServe 0.12 takes a local archive outside the model store only as a file:// URL, allowed_urls). `grpc` and `management_pb2` come from the test's prelude (TorchServe's generated stubs); the placeholder `/workspace/model/` is the test's directory.
def register(stub, model_name):
    params = {
        'url': f"file:///workspace/model/{model_name}.mar",
        'initial_workers': 1,
        'synchronous': True,
        'model_name': model_name
    }
    try:
        response = stub.RegisterModel(management_pb2.RegisterModelRequest(**params))
        print(f"Model {model_name} registered successfully")
    except grpc.RpcError as e:
        print(f"Failed to register model {model_name}.")
        print(str(e.details()))
        exit(1)
