"""Google's original ALBERT checkpoints onto ``transformers``' ``Albert*`` classes.

The TensorFlow names are those of google-research/albert's ``modeling.py`` (``bert/embeddings/...``,
``bert/encoder/embedding_hidden_mapping_in``, the shared layers
``bert/encoder/transformer/group_G/inner_group_I/{attention_1,LayerNorm,ffn_1,LayerNorm_1}/...``,
``bert/pooler/dense``, ``cls/predictions/...``, ``cls/seq_relationship/...``); the targets are what
``transformers.models.albert.modeling_albert.load_tf_weights_in_albert`` (4.57.6) gives after its
renames (``attention_1/self/query`` is ``attention.query``, ``attention_1/output/dense`` is
``attention.dense``, ``LayerNorm`` is ``attention.LayerNorm``, ``ffn_1/intermediate/dense`` is
``ffn``, ``ffn_1/intermediate/output/dense`` is ``ffn_output``, ``LayerNorm_1`` is
``full_layer_layer_norm``; the sentence-order head is ``sop_classifier.classifier``). A TF-Hub
export's ``module/`` prefix is accepted too.
"""

from __future__ import annotations

from ..mapping import NOT_MODEL_KINDS, NameMap, Rule, rule, skip
from ._base import PrefixedPreset
from .bert import ADAM_WEIGHT_DECAY, _dense, _norm


def albert_rules(base: str) -> list[Rule]:
    """The rules with ``AlbertModel``'s attributes under ``base`` ("albert." or "")."""
    b = base
    m = "(?:module/)?"  # TF-Hub modules
    inner = m + r"bert/encoder/transformer/group_(\d+)/inner_group_(\d+)"
    to = b + r"encoder.albert_layer_groups.\1.albert_layers.\2"
    return [
        ADAM_WEIGHT_DECAY,
        skip(kinds=NOT_MODEL_KINDS),
        rule(m + r"bert/embeddings/(word|position|token_type)_embeddings", b + r"embeddings.\1_embeddings.weight"),
        *_norm(m + "bert/embeddings/LayerNorm", b + "embeddings.LayerNorm"),
        *_dense(m + "bert/encoder/embedding_hidden_mapping_in", b + "encoder.embedding_hidden_mapping_in"),
        *_dense(inner + r"/attention_1/self/(query|key|value)", to + r".attention.\3"),
        *_dense(inner + "/attention_1/output/dense", to + ".attention.dense"),
        *_norm(inner + "/LayerNorm", to + ".attention.LayerNorm"),
        *_dense(inner + "/ffn_1/intermediate/dense", to + ".ffn"),
        *_dense(inner + "/ffn_1/intermediate/output/dense", to + ".ffn_output"),
        *_norm(inner + "/LayerNorm_1", to + ".full_layer_layer_norm"),
        *_dense(m + "bert/pooler/dense", b + "pooler"),
        *_dense(m + "cls/predictions/transform/dense", "predictions.dense"),
        *_norm(m + "cls/predictions/transform/LayerNorm", "predictions.LayerNorm"),
        rule(m + "cls/predictions/output_bias", "predictions.bias"),
        rule(m + "cls/seq_relationship/output_weights", "sop_classifier.classifier.weight"),
        rule(m + "cls/seq_relationship/output_bias", "sop_classifier.classifier.bias"),
    ]


def albert() -> NameMap:
    """The ALBERT preset; binds to ``albert.`` or to a bare ``AlbertModel``."""
    return PrefixedPreset("albert", albert_rules, base="albert.", default_base="albert.")
