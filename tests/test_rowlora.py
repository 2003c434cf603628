"""rowlora.rows_lora_forward against PEFT's own mixed-batch forward: the same output bit for bit."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear

from chatloop.engine.rowlora import row_groups, rows_lora_forward
from chatloop.engine.weights import PackedLinear


def two_adapter_layer(base: torch.nn.Linear, lora_bias: bool = False) -> LoraLinear:
    torch.manual_seed(0)
    layer = LoraLinear(base, "a", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, lora_bias=lora_bias),
                       r=4, lora_alpha=8)
    layer.update_layer("b", 2, lora_alpha=7, config=LoraConfig(r=2, lora_alpha=7, init_lora_weights=False,
                                                               lora_bias=lora_bias, lora_dropout=0.1))
    return layer.eval()


@pytest.mark.parametrize("names", [["a", "__base__", "b", "a"], ["b", "b", "b", "b"], ["__base__"] * 4,
                                   ["a", "b", "c", "__base__"]])
@pytest.mark.parametrize("packed", [False, True])
def test_each_row_gets_what_peft_gives_it(names, packed):
    """Every mix of adapters (one absent from the layer: 'c') over fp32 and packed int4 weights."""
    torch.manual_seed(1)
    base = torch.nn.Linear(64, 48)
    layer = two_adapter_layer(PackedLinear(base, "int4") if packed else base)
    x = torch.randn(4, 3, 64)
    with torch.inference_mode():
        ours = rows_lora_forward(layer, row_groups(names, x.device), x)
        peft = LoraLinear.forward(layer, x, adapter_names=names)
        alone = [LoraLinear.forward(layer, x[i:i + 1], adapter_names=[n]) for i, n in enumerate(names)]
    assert torch.equal(ours, peft)
    if "b" in names:  # a row's LoRA does reach it
        i = names.index("b")
        assert not torch.equal(ours[i], layer.base_layer(x[i:i + 1])[0])
    for i, row in enumerate(alone):
        assert torch.allclose(ours[i], row[0], atol=1e-5)


def test_a_lora_bias_and_a_training_dropout_are_peft_s():
    torch.manual_seed(2)
    layer = two_adapter_layer(torch.nn.Linear(64, 48), lora_bias=True)
    x = torch.randn(3, 2, 64)
    names = ["a", "b", "__base__"]
    with torch.inference_mode():
        assert torch.equal(rows_lora_forward(layer, row_groups(names, x.device), x),
                           LoraLinear.forward(layer, x, adapter_names=names))
    layer.lora_dropout["b"].train()  # not the identity now: PEFT's own forward runs it
    torch.manual_seed(3)
    ours = rows_lora_forward(layer, row_groups(names, x.device), x)
    torch.manual_seed(3)
    assert torch.equal(ours, LoraLinear.forward(layer, x, adapter_names=names))


def test_no_routing_is_peft_s_plain_forward():
    layer = two_adapter_layer(torch.nn.Linear(64, 48))
    x = torch.randn(2, 5, 64)
    with torch.inference_mode():
        assert torch.equal(rows_lora_forward(layer, None, x), LoraLinear.forward(layer, x))
