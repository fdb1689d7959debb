"""TorchServe handlers that ``benchmarks/bench_serving.py`` compares ctrserve's PersiaHandler with."""
