"""Padding-free packing is only allowed with attention kernels that keep packed sequences apart."""

import pytest
import torch

from lexfine import models
from lexfine.config import ModelArgs, build_config
from lexfine.errors import ConfigError
from tests.conftest import tiny_arch


def test_padding_free_with_sdpa_is_refused():
    with pytest.raises(ConfigError, match="flash_attention_2") as e:
        build_config({}, ["train.padding_free=true"])
    assert "\n" not in str(e.value) and "'<root>'" not in str(e.value)
    assert build_config({}, ["train.padding_free=true", "model_args.attn_implementation=flash_attention_2"])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_why_packed_sequences_leak_without_varlen_kernels(impl):
    """The reason for the guard: a packed row with restarting position ids still attends across sequences with
    sdpa/eager in this transformers. If this test starts failing, transformers isolates packed sequences itself and
    the guard in config.py can be relaxed."""
    model = models.load_model("random:apertus-8b", ModelArgs(arch_overrides=tiny_arch(), dtype="float32",
                                                             attn_implementation=impl)).eval()
    a, b = torch.randint(5, 1000, (1, 7)), torch.randint(5, 1000, (1, 5))
    with torch.no_grad():
        alone = model(b).logits
        packed = model(torch.cat([a, b], 1), position_ids=torch.cat([torch.arange(7), torch.arange(5)])[None]).logits
    assert not torch.allclose(packed[:, 7:], alone, atol=1e-5)
