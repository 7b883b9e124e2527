"""OpenAI's original GPT-2 checkpoints onto ``transformers``' ``GPT2*`` classes.

The TensorFlow names are those of openai/gpt-2's ``src/model.py`` (``model/wte``, ``model/wpe``,
``model/h0/attn/c_attn/w``, ``model/h0/ln_1/g``, ``model/ln_f/b``, ...). As in
``transformers.models.gpt2.modeling_gpt2.load_tf_weights_in_gpt2`` (4.57.6), every tensor is
squeezed (the ``[1, nx, nf]`` Conv1D kernels become ``Conv1D``'s ``[nx, nf]`` weight, stored the
same way round: no transpose); ``g``/``b`` are a LayerNorm's or Conv1D's weight and bias.
"""

from __future__ import annotations

from ..mapping import NOT_MODEL_KINDS, SQUEEZE, NameMap, Rule, rule, skip
from ._base import PrefixedPreset


def gpt2_rules(base: str) -> list[Rule]:
    """The rules with ``GPT2Model``'s attributes under ``base`` (``"transformer."`` or ``""``)."""
    b = base
    block = r"model/h(\d+)"
    to = b + r"h.\1"
    return [
        skip(kinds=NOT_MODEL_KINDS),
        rule(r"model/(wte|wpe)", b + r"\1.weight", reshape=SQUEEZE),
        rule(block + r"/(ln_1|ln_2)/g", to + r".\2.weight", reshape=SQUEEZE),
        rule(block + r"/(ln_1|ln_2)/b", to + r".\2.bias", reshape=SQUEEZE),
        rule(block + r"/(attn|mlp)/(c_attn|c_proj|c_fc)/w", to + r".\2.\3.weight", reshape=SQUEEZE),
        rule(block + r"/(attn|mlp)/(c_attn|c_proj|c_fc)/b", to + r".\2.\3.bias", reshape=SQUEEZE),
        rule(r"model/ln_f/g", b + "ln_f.weight", reshape=SQUEEZE),
        rule(r"model/ln_f/b", b + "ln_f.bias", reshape=SQUEEZE),
    ]


def gpt2() -> NameMap:
    """The GPT-2 preset (see the module docs); binds to ``GPT2Model`` or a ``transformer.`` base."""
    return PrefixedPreset("gpt2", gpt2_rules, base="transformer.", default_base="")
