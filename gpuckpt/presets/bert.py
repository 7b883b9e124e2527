"""Google's original BERT checkpoints onto ``transformers``' ``Bert*`` classes.

The TensorFlow names are those of google-research/bert's ``modeling.py`` and ``run_pretraining.py``
(``bert/embeddings/word_embeddings``, ``bert/encoder/layer_N/attention/self/query/kernel``,
``cls/predictions/output_bias``, ...); the targets and transforms are what
``transformers.models.bert.modeling_bert.load_tf_weights_in_bert`` (4.57.6) does: ``kernel`` is
transposed into a ``Linear`` weight, ``gamma``/``beta`` are a LayerNorm's weight and bias,
``output_weights`` is a weight as stored. AdamWeightDecay's ``adam_m``/``adam_v`` slots and
``global_step`` are skipped; so are optimizer slots, optimizer state and counters by kind.
"""

from __future__ import annotations

from ..mapping import NOT_MODEL_KINDS, NameMap, Rule, rule, skip
from ._base import PrefixedPreset


def _dense(tf: str, pt: str) -> list[Rule]:
    return [rule(tf + "/kernel", pt + ".weight", transpose=True), rule(tf + "/bias", pt + ".bias")]


def _norm(tf: str, pt: str) -> list[Rule]:
    return [rule(tf + "/gamma", pt + ".weight"), rule(tf + "/beta", pt + ".bias")]


ADAM_WEIGHT_DECAY = skip(
    r"(.*/)?(adam_m|adam_v|AdamWeightDecayOptimizer|AdamWeightDecayOptimizer_1)(/.*)?", why="AdamWeightDecay"
)


def encoder_rules(root: str, base: str) -> list[Rule]:
    """The embeddings and encoder layers of google-research/bert's ``modeling.py`` under the TF
    scope ``root`` ("bert", "electra"), onto ``base`` + transformers' names."""
    b = base
    layer = root + r"/encoder/layer_(\d+)"
    to = b + r"encoder.layer.\1"
    return [
        rule(root + r"/embeddings/(word|position|token_type)_embeddings", b + r"embeddings.\1_embeddings.weight"),
        *_norm(root + "/embeddings/LayerNorm", b + "embeddings.LayerNorm"),
        *_dense(layer + r"/attention/self/(query|key|value)", to + r".attention.self.\2"),
        *_dense(layer + "/attention/output/dense", to + ".attention.output.dense"),
        *_norm(layer + "/attention/output/LayerNorm", to + ".attention.output.LayerNorm"),
        *_dense(layer + "/intermediate/dense", to + ".intermediate.dense"),
        *_dense(layer + "/output/dense", to + ".output.dense"),
        *_norm(layer + "/output/LayerNorm", to + ".output.LayerNorm"),
    ]


def bert_rules(base: str) -> list[Rule]:
    """The rules with the base model's attributes under ``base`` (``"bert."`` or ``""``)."""
    return [
        ADAM_WEIGHT_DECAY,
        skip(kinds=NOT_MODEL_KINDS),
        *encoder_rules("bert", base),
        *_dense("bert/pooler/dense", base + "pooler.dense"),
        # the pre-training heads (BertForPreTraining, BertForMaskedLM: cls.predictions; NSP: cls.seq_relationship)
        *_dense("cls/predictions/transform/dense", "cls.predictions.transform.dense"),
        *_norm("cls/predictions/transform/LayerNorm", "cls.predictions.transform.LayerNorm"),
        rule("cls/predictions/output_bias", "cls.predictions.bias"),
        rule("cls/seq_relationship/output_weights", "cls.seq_relationship.weight"),
        rule("cls/seq_relationship/output_bias", "cls.seq_relationship.bias"),
    ]


def bert() -> NameMap:
    """The BERT preset (see the module docs); binds to ``bert.`` or to a bare ``BertModel``."""
    return PrefixedPreset("bert", bert_rules, base="bert.", default_base="bert.")
