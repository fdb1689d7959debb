"""embedding_server.core.model_spec: model signatures and their record in model.json."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.errors import ConfigError
from embedding_server.core.model_spec import DenseModelSpec, FeatureSpec, ModelSignature, model_signature
from trainer.export import export_dense

pytestmark = pytest.mark.unit


class PersiaStyle(nn.Module):
    def forward(self, non_id_type_tensors: list[Tensor], id_type_tensors: list[Tensor]) -> Tensor:
        return non_id_type_tensors[0].sum(1, keepdim=True) + id_type_tensors[0].sum(1, keepdim=True)


class CtrserveStyle(nn.Module):
    def forward(self, dense: Tensor, sparse: list[Tensor]) -> Tensor:
        return dense.sum(1, keepdim=True) + sparse[0].sum(1, keepdim=True)


@pytest.mark.parametrize(
    ("cls", "expected"), [(PersiaStyle, ModelSignature.PERSIA), (CtrserveStyle, ModelSignature.CTRSERVE)]
)
def test_model_signature_of_modules_and_torchscript(cls, expected):
    assert model_signature(cls()) is expected
    assert model_signature(torch.jit.script(cls())) is expected


def test_export_records_the_signature_and_old_specs_read_as_ctrserve(tmp_path):
    config = EmbeddingConfig.from_dict({"slots_config": {"user": {"dim": 2}}})
    export_dense(PersiaStyle(), config, str(tmp_path), step=1, dense_width=3)
    spec = DenseModelSpec.from_json((tmp_path / "dense" / "v00000001" / "model.json").read_text())
    assert spec.signature == "persia"
    old = json.loads(DenseModelSpec(version=1, step=0, dense_width=1, features=[FeatureSpec("user", 2)]).to_json())
    del old["signature"]
    assert DenseModelSpec.from_json(json.dumps(old)).signature == "ctrserve"
    old["signature"] = "tensorflow"
    with pytest.raises(ConfigError, match="'signature' must be one of"):
        DenseModelSpec.from_json(json.dumps(old))
