"""Name-mapping presets: original TensorFlow releases onto ``transformers``' PyTorch classes.

* ``"bert"``: Google's original BERT checkpoints (``bert/encoder/layer_N/...``, the pre-training
  heads ``cls/...``) onto ``BertModel``, ``BertForPreTraining`` (and the other ``Bert*`` classes
  with a ``bert.`` base model), the names ``transformers.load_tf_weights_in_bert`` (4.x) gives.
* ``"albert"``: Google's original ALBERT checkpoints (shared layer groups
  ``bert/encoder/transformer/group_G/inner_group_I/...``) onto ``AlbertModel``/``AlbertForPreTraining``,
  as ``load_tf_weights_in_albert`` names them.
* ``"electra"``: Google's original ELECTRA checkpoints, the discriminator (``electra/...``,
  ``discriminator_predictions/...``) onto ``ElectraModel``/``ElectraForPreTraining``, as
  ``load_tf_weights_in_electra`` names them; the generator is skipped (reported).
* ``"gpt2"``: OpenAI's original GPT-2 checkpoints (``model/h0/attn/c_attn/w``, ...) onto
  ``GPT2Model`` (and ``GPT2LMHeadModel`` through its ``transformer.`` base), as
  ``load_tf_weights_in_gpt2`` names them.

Each preset is a :class:`gpuckpt.mapping.NameMap` whose :meth:`~gpuckpt.mapping.NameMap.bind`
picks the base model's prefix from the target's names; unbound (``gpuckpt convert``), it uses the
names of the pre-training class (``bert.``; GPT-2's base names), which ``from_pretrained`` loads
into every class of the family.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import InvalidArgumentError
from ..mapping import NameMap
from .albert import albert
from .bert import bert
from .electra import electra
from .gpt2 import gpt2

PRESETS: dict[str, Callable[[], NameMap]] = {"albert": albert, "bert": bert, "electra": electra, "gpt2": gpt2}


def get_preset(name: str) -> NameMap:
    """The preset called ``name`` (InvalidArgumentError naming the presets for any other)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise InvalidArgumentError(f"no mapping preset {name!r}; presets: {', '.join(PRESETS)}") from None


__all__ = ["PRESETS", "albert", "bert", "electra", "get_preset", "gpt2"]
