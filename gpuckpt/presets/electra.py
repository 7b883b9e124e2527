"""Google's original ELECTRA checkpoints (the discriminator) onto ``transformers``' ``Electra*`` classes.

The TensorFlow names are those of google-research/electra (``electra/embeddings/...``,
``electra/embeddings_project``, ``electra/encoder/layer_N/...`` as BERT's, and the
discriminator head ``discriminator_predictions/dense`` and ``dense_1``); the targets are what
``transformers.models.electra.modeling_electra.load_tf_weights_in_electra`` (4.57.6) gives with
``discriminator_or_generator="discriminator"``. The generator (``generator/...``,
``generator_predictions/...``), a separate model, is skipped and reported as such, as are
AdamWeightDecay's slots, ``global_step`` and the other non-model kinds.
"""

from __future__ import annotations

from ..mapping import NOT_MODEL_KINDS, NameMap, Rule, skip
from ._base import PrefixedPreset
from .bert import ADAM_WEIGHT_DECAY, _dense, encoder_rules


def electra_rules(base: str) -> list[Rule]:
    """The discriminator's rules with ``ElectraModel``'s attributes under ``base`` ("electra." or "")."""
    return [
        ADAM_WEIGHT_DECAY,
        skip(kinds=NOT_MODEL_KINDS),
        skip(r"(generator|generator_predictions)/.*", why="the ELECTRA generator, a separate model"),
        *encoder_rules("electra", base),
        *_dense("electra/embeddings_project", base + "embeddings_project"),
        *_dense("discriminator_predictions/dense", "discriminator_predictions.dense"),
        *_dense("discriminator_predictions/dense_1", "discriminator_predictions.dense_prediction"),
    ]


def electra() -> NameMap:
    """The ELECTRA discriminator preset; binds to ``electra.`` or to a bare ``ElectraModel``."""
    return PrefixedPreset("electra", electra_rules, base="electra.", default_base="electra.")
