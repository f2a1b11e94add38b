"""random:<arch> weights do not depend on where they are built (issue 18: ZeRO-3's init order and the GPU's RNG gave
1 GPU, ZeRO-2/FSDP2 and ZeRO-3 different base models)."""

import pytest
import torch

from lexfine import models
from lexfine.config import ModelArgs
from tests.conftest import tiny_arch


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_random_architecture_is_built_once_and_loaded_the_same_everywhere(tmp_path, monkeypatch, smollm_tokenizer):
    monkeypatch.setenv("LEXFINE_CACHE", str(tmp_path))
    args = ModelArgs(arch_overrides=tiny_arch(), dtype="float32")
    spec = models.resolve("random:apertus-8b")
    saved = models.random_weights_dir(spec, args, smollm_tokenizer)
    assert saved is not None and saved.parent == tmp_path / "models" and (saved / "config.json").is_file()
    assert models.random_weights_dir(spec, args, smollm_tokenizer) == saved  # found, not rebuilt

    torch.manual_seed(0)
    a = models.load_model(spec, args, tokenizer=smollm_tokenizer)
    torch.manual_seed(1)  # the caller's RNG state does not matter
    b = models.load_model(spec, args, tokenizer=smollm_tokenizer, dtype=torch.bfloat16)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k].to(torch.bfloat16), wb[k]) for k in wa)
    # an adapter trained on it records no machine-specific base path (lexfine eval checks it against random:<arch>)
    assert a.name_or_path == "" and a.config._name_or_path == ""

    # above the size limit the architecture is built in place: on the CPU, the same weights as the cached copy
    monkeypatch.setenv("LEXFINE_RANDOM_CACHE_MAX_PARAMS", "1000")
    other = ModelArgs(arch_overrides={**tiny_arch(), "num_hidden_layers": 1}, dtype="float32")
    assert models.random_weights_dir(spec, other, smollm_tokenizer) is None
    state = torch.random.get_rng_state()
    c = models.load_model(spec, other, tokenizer=smollm_tokenizer)
    assert torch.equal(torch.random.get_rng_state(), state)  # built with the fixed seed, the caller's RNG untouched
    monkeypatch.delenv("LEXFINE_RANDOM_CACHE_MAX_PARAMS")
    d = models.load_model(spec, other, tokenizer=smollm_tokenizer)  # now cached: same values as built in place
    wc, wd = _weights(c), _weights(d)
    assert all(torch.equal(wc[k], wd[k]) for k in wc)


def test_an_arch_override_yaml_misread_is_refused_not_ignored(caplog):
    """`{num_hidden_layers:2}` (no space) parses as the key 'num_hidden_layers:2': ignored, it would build the 8B."""
    from lexfine.errors import ModelError

    from lexfine.config import build_config
    from lexfine.errors import ConfigError

    spec = models.resolve("random:apertus-8b")
    with pytest.raises(ConfigError, match="space after each colon"):  # config show, sweep plan and train alike
        build_config({}, ["model=random:apertus-8b", "model_args.arch_overrides={num_hidden_layers:2}"])
    with caplog.at_level("WARNING"):
        config = models.architecture_config(spec, ModelArgs(arch_overrides={"num_hiden_layers": 2}))
    assert config.num_hidden_layers == 32 and "num_hiden_layers" in caplog.text
