"""gpuckpt.mapping (the rule language) and the presets, the presets checked against transformers 4.57.6:
TensorFlow writes small BERT and GPT-2 checkpoints with the original variable names (tf.compat.v1
variables and Saver, random values), transformers' own load_tf_weights_in_bert /
load_tf_weights_in_gpt2 fill one model, gpuckpt's preset another of the same config (initialised
differently), and every tensor of the two state dicts must be equal bit for bit, then the outputs
on a fixed input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import gpuckpt
from gpuckpt.mapping import NOT_MODEL_KINDS, SQUEEZE, NameMap, as_name_map, rule, skip
from gpuckpt.presets import PRESETS, get_preset

# -- the rule language (no framework needed) --------------------------------------------------------


def test_rules_expand_captured_indices_and_the_first_match_decides():
    m = NameMap(
        [
            skip(r".*/adam_[mv]", why="slots"),
            rule(r"enc/layer_(\d+)/(q|k)/kernel", r"encoder.\1.\2.weight", transpose=True),
            rule(r"enc/layer_(?P<n>\d+)/.*", r"encoder.\g<n>.other"),
        ]
    )
    plan = m.plan(["enc/layer_3/q/kernel", "enc/layer_3/q/kernel/adam_m", "enc/layer_12/norm", "dec/x"])
    assert {k: v.target for k, v in plan.mapped.items()} == {
        "enc/layer_3/q/kernel": "encoder.3.q.weight",
        "enc/layer_12/norm": "encoder.12.other",
    }
    assert plan.skipped == {"enc/layer_3/q/kernel/adam_m": "slots"}
    assert plan.unmapped == ["dec/x"]  # reported, never dropped


def test_skip_by_kind_uses_checkpoint_kind_or_the_name():
    m = NameMap([skip(kinds=NOT_MODEL_KINDS)], fallback=lambda n: n)
    plan = m.plan(["w", "w/Adam", "global_step", "beta1_power"])
    assert list(plan.mapped) == ["w"]
    assert plan.skipped == {
        "w/Adam": "kind optimizer_slot",
        "global_step": "kind counter",
        "beta1_power": "kind optimizer",
    }
    kinds = {"w": gpuckpt.StateKind.COUNTER}
    assert NameMap([skip(kinds=["counter"])]).plan(["w"], kind=kinds.get).skipped == {"w": "kind counter"}


def test_two_names_onto_one_target_are_refused_naming_both():
    m = NameMap([rule(r"(a|b)", "same")])
    with pytest.raises(gpuckpt.InvalidArgumentError, match="'a' and 'b' both map to 'same'"):
        m.plan(["a", "b"])


def test_bad_rules_are_refused_when_written():
    with pytest.raises(gpuckpt.InvalidArgumentError, match="regular expression"):
        rule("(", "x")
    with pytest.raises(gpuckpt.InvalidArgumentError, match="invalid group reference 2"):
        rule(r"a(\d)", r"x\2")
    with pytest.raises(gpuckpt.InvalidArgumentError, match="unknown group name 'n'"):
        rule(r"a(\d)", r"x\g<n>")
    with pytest.raises(gpuckpt.InvalidArgumentError, match="reshape"):
        rule("a", "b", reshape="flat")
    for bad in (5, "ab", (0.0, 1.0), (True, False)):
        with pytest.raises(gpuckpt.InvalidArgumentError, match="transpose=.* is not a sequence of integers"):
            rule("a", "b", transpose=bad)
    with pytest.raises(gpuckpt.InvalidArgumentError, match=r"transpose=\[0, 0\] is not a permutation"):
        rule("a", "b", transpose=(0, 0))
    for bad in (7, (2.5, 4), (2, None)):
        with pytest.raises(gpuckpt.InvalidArgumentError, match="reshape=.* is not a sequence of integers"):
            rule("a", "b", reshape=bad)
    with pytest.raises(gpuckpt.InvalidArgumentError, match="negative size"):
        rule("a", "b", reshape=(-2, -3))
    assert rule("a", "b", transpose=np.array([1, 0]), reshape=[np.int64(2), 3]).reshape == (2, 3)
    assert rule("a", "b", reshape=np.array([2, 3])).reshape == (2, 3)  # not compared with "target"
    assert rule("a", "b", reshape=np.array([], np.int64)).reshape == ()
    with pytest.raises(gpuckpt.InvalidArgumentError):
        skip()
    with pytest.raises(gpuckpt.InvalidArgumentError, match="not a Rule"):
        NameMap(["a"])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "template",
    [
        r"x\\2",  # an escaped backslash, then a 2: no group 2
        r"x\\\2",
        r"x\3",
        r"x\012",  # octal
        r"x\0",
        r"x\123",  # three octal digits: a character, not group 12
        r"x\g<n>",
        r"x\g<2>",
        r"x\g<3>",
        r"x\\g<q>",
        r"x\g<q>",
        r"x\8",
        r"x\12",
        r"\n\2",
        r"x\q",  # a bad escape
        r"x\g<1a>",
        "plain/name",
    ],
)
def test_a_template_is_refused_exactly_when_re_cannot_expand_it(template):
    """The check agrees with Python's own template rules (re.Match.expand), escapes included."""
    pattern = r"a(\d)(?P<n>\d)"
    try:
        re.match(pattern, "a12").expand(template)
        expands = True
    except (re.error, IndexError):
        expands = False
    if expands:
        assert rule(pattern, template).target == template
    else:
        with pytest.raises(gpuckpt.InvalidArgumentError, match="is not a template"):
            rule(pattern, template)


def test_shapes_after_reshape_and_transpose():
    assert rule("a", "b", transpose=True).result_shape((2, 3)) == (3, 2)
    assert rule("a", "b", transpose=(1, 2, 0)).result_shape((2, 3, 4)) == (3, 4, 2)
    assert rule("a", "b", reshape=SQUEEZE).result_shape((1, 5, 1, 6)) == (5, 6)
    assert rule("a", "b", reshape=(6,)).result_shape((2, 3)) == (6,)
    assert rule("a", "b", reshape="target").result_shape((6,), (3, 2)) == (3, 2)
    both = rule("a", "b", reshape="target", transpose=True)
    assert both.reshaped_shape((6,), (3, 2)) == (2, 3) and both.result_shape((6,), (3, 2)) == (3, 2)
    with pytest.raises(gpuckpt.InvalidArgumentError, match="cannot reshape"):
        rule("a", "b", reshape=(5,)).result_shape((2, 3))


def test_json_rules_and_extending_a_preset(tmp_path):
    spec = {
        "rules": [
            {"skip_kinds": ["optimizer_slot", "counter"]},
            {"skip": ".*/ema", "why": "moving averages"},
            {"match": r"net/(\w+)/kernel", "to": r"net.\1.weight", "transpose": True, "dtype": "float16"},
        ]
    }
    path = tmp_path / "map.json"
    path.write_text(json.dumps(spec))
    m = as_name_map(str(path))
    plan = m.plan(["net/fc/kernel", "net/fc/ema", "global_step", "w/Adam", "other"])
    assert plan.mapped["net/fc/kernel"].target == "net.fc.weight"
    assert plan.mapped["net/fc/kernel"].rule.dtype == "float16"
    assert set(plan.skipped) == {"net/fc/ema", "global_step", "w/Adam"} and plan.unmapped == ["other"]
    extended = NameMap.from_dict({"preset": "bert", "rules": [{"match": "bert/extra", "to": "bert.extra"}]})
    plan = extended.bind(["bert.embeddings.word_embeddings.weight"]).plan(["bert/extra", "bert/pooler/dense/bias"])
    assert {k: v.target for k, v in plan.mapped.items()} == {
        "bert/extra": "bert.extra",
        "bert/pooler/dense/bias": "bert.pooler.dense.bias",
    }
    for bad in ({"rules": [{"match": "a"}]}, {"rules": [{"skip": "a", "to": "b"}]}, {"rule": []}, []):
        with pytest.raises(gpuckpt.InvalidArgumentError):
            NameMap.from_dict(bad)  # type: ignore[arg-type]
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(gpuckpt.InvalidArgumentError, match="not JSON"):
        as_name_map(str(tmp_path / "broken.json"))
    with pytest.raises(gpuckpt.InvalidArgumentError, match="neither a preset"):
        as_name_map("no-such-preset-or-file")


def test_presets_bind_to_the_base_model_prefix():
    assert set(PRESETS) == {"albert", "bert", "electra", "gpt2"}
    bert = get_preset("bert")
    name = "bert/encoder/layer_1/attention/self/query/kernel"
    assert bert.lookup(name).target == "bert.encoder.layer.1.attention.self.query.weight"  # unbound: pre-training names
    assert bert.bind(["embeddings.word_embeddings.weight"]).lookup(name).target == (
        "encoder.layer.1.attention.self.query.weight"
    )
    assert bert.lookup("cls/predictions/output_bias").target == "cls.predictions.bias"
    assert bert.lookup("bert/encoder/layer_0/output/dense/kernel/adam_v") == "AdamWeightDecay"
    gpt2 = get_preset("gpt2")
    assert gpt2.lookup("model/h11/attn/c_attn/w").target == "h.11.attn.c_attn.weight"
    assert (
        gpt2.bind(["transformer.wte.weight", "lm_head.weight"]).lookup("model/wte").target == "transformer.wte.weight"
    )
    with pytest.raises(gpuckpt.InvalidArgumentError, match="presets: albert, bert, electra, gpt2"):
        get_preset("roberta")


# -- against transformers 4.57.6 -----------------------------------------------------------------------


def _frameworks():
    torch = pytest.importorskip("torch", reason="the presets are checked with PyTorch (pip install torch==2.13.0)")
    transformers = pytest.importorskip("transformers", reason="pip install transformers==4.57.6")
    if not hasattr(transformers.models.bert.modeling_bert, "load_tf_weights_in_bert"):
        pytest.skip(f"transformers {transformers.__version__} has no TF loaders (4.57.6 is the last that has)")
    from conftest import tf_or_skip

    return torch, transformers, tf_or_skip()


def _tf_v1_save(tf, prefix: str, arrays: dict[str, np.ndarray]) -> str:
    """Save ``arrays`` as tf.compat.v1 variables of exactly these names with a v1 Saver."""
    with tf.Graph().as_default():
        variables = [tf.compat.v1.get_variable(name, initializer=value) for name, value in arrays.items()]
        assert [v.op.name for v in variables] == list(arrays)
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            return saver.save(session, prefix, write_meta_graph=False)


BERT = {"vocab": 99, "hidden": 32, "layers": 2, "heads": 4, "intermediate": 37, "positions": 64, "types": 2}


def _bert_arrays(rng: np.random.Generator, heads: bool = True) -> dict[str, np.ndarray]:
    """The variables of google-research/bert's modeling.py (and run_pretraining.py's heads)."""
    h, i, v = BERT["hidden"], BERT["intermediate"], BERT["vocab"]
    shapes: dict[str, tuple[int, ...]] = {
        "bert/embeddings/word_embeddings": (v, h),
        "bert/embeddings/position_embeddings": (BERT["positions"], h),
        "bert/embeddings/token_type_embeddings": (BERT["types"], h),
        "bert/embeddings/LayerNorm/gamma": (h,),
        "bert/embeddings/LayerNorm/beta": (h,),
    }
    for n in range(BERT["layers"]):
        p = f"bert/encoder/layer_{n}"
        for part in ("query", "key", "value"):
            shapes[f"{p}/attention/self/{part}/kernel"] = (h, h)
            shapes[f"{p}/attention/self/{part}/bias"] = (h,)
        shapes.update(
            {
                f"{p}/attention/output/dense/kernel": (h, h),
                f"{p}/attention/output/dense/bias": (h,),
                f"{p}/attention/output/LayerNorm/gamma": (h,),
                f"{p}/attention/output/LayerNorm/beta": (h,),
                f"{p}/intermediate/dense/kernel": (h, i),
                f"{p}/intermediate/dense/bias": (i,),
                f"{p}/output/dense/kernel": (i, h),
                f"{p}/output/dense/bias": (h,),
                f"{p}/output/LayerNorm/gamma": (h,),
                f"{p}/output/LayerNorm/beta": (h,),
            }
        )
    shapes["bert/pooler/dense/kernel"] = (h, h)
    shapes["bert/pooler/dense/bias"] = (h,)
    if heads:
        shapes.update(
            {
                "cls/predictions/transform/dense/kernel": (h, h),
                "cls/predictions/transform/dense/bias": (h,),
                "cls/predictions/transform/LayerNorm/gamma": (h,),
                "cls/predictions/transform/LayerNorm/beta": (h,),
                "cls/predictions/output_bias": (v,),
                "cls/seq_relationship/output_weights": (2, h),
                "cls/seq_relationship/output_bias": (2,),
            }
        )
    arrays = {name: (rng.standard_normal(shape) * 0.2).astype(np.float32) for name, shape in shapes.items()}
    # AdamWeightDecayOptimizer's slots and the step, as in Google's released pre-training checkpoints
    for name in ["bert/encoder/layer_0/attention/self/query/kernel", "cls/predictions/output_bias"][
        : 2 if heads else 1
    ]:
        arrays[name + "/adam_m"] = np.zeros_like(arrays[name])
        arrays[name + "/adam_v"] = np.ones_like(arrays[name])
    arrays["global_step"] = np.int64(1000)
    return arrays


def _bert_config(transformers):
    return transformers.BertConfig(
        vocab_size=BERT["vocab"],
        hidden_size=BERT["hidden"],
        num_hidden_layers=BERT["layers"],
        num_attention_heads=BERT["heads"],
        intermediate_size=BERT["intermediate"],
        max_position_embeddings=BERT["positions"],
        type_vocab_size=BERT["types"],
    )


def _bits(torch, tensor):
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.detach().contiguous().view(width)


def _assert_state_dicts_equal(torch, ours, theirs):
    """The same names, dtypes and shapes, and the same bits in every tensor."""
    ours, theirs = ours.state_dict(), theirs.state_dict()
    assert list(ours) == list(theirs)
    for name in theirs:
        a, b = ours[name], theirs[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(_bits(torch, a), _bits(torch, b)), name


def _same_layout(torch, model):
    """transformers' loaders leave each transposed kernel as a non-contiguous view of a numpy array
    (``pointer.data = torch.from_numpy(np.transpose(array))``); a matmul with a transposed operand
    takes another BLAS path, whose rounding can differ in the last bit. The values are compared bit
    for bit first; the outputs are compared with the same (contiguous) layout."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.is_contiguous():
                parameter.data = parameter.data.contiguous()
    return model.eval()


@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory):
    torch, transformers, tf = _frameworks()
    prefix = str(tmp_path_factory.mktemp("bert") / "bert_model.ckpt")
    _tf_v1_save(tf, prefix, _bert_arrays(np.random.default_rng(2024)))
    return prefix


def test_bert_preset_equals_transformers_load_tf_weights_in_bert(bert_checkpoint):
    torch, transformers, tf = _frameworks()
    import gpuckpt.torch as gt

    config = _bert_config(transformers)
    torch.manual_seed(0)
    theirs = transformers.BertForPreTraining(config)
    transformers.models.bert.modeling_bert.load_tf_weights_in_bert(theirs, config, bert_checkpoint)
    torch.manual_seed(1)  # initialised differently: every tensor must come from the checkpoint
    ours = transformers.BertForPreTraining(config)
    pointers = {n: t.data_ptr() for n, t in ours.state_dict(keep_vars=True).items()}
    result = gt.load_into(ours, bert_checkpoint, mapping="bert")  # strict
    assert result.ok, result.describe()
    names = [n for n, _ in gpuckpt.list_variables(bert_checkpoint)]
    assert set(result.skipped) == {n for n in names if n.endswith(("/adam_m", "/adam_v")) or n == "global_step"}
    assert {n: t.data_ptr() for n, t in ours.state_dict(keep_vars=True).items()} == pointers  # in place
    _assert_state_dicts_equal(torch, ours, theirs)

    _same_layout(torch, theirs), ours.eval()
    ids = torch.tensor([[2, 7, 19, 33, 98, 0, 5, 61]])
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        a = theirs(input_ids=ids, token_type_ids=types)
        b = ours(input_ids=ids, token_type_ids=types)
    assert torch.equal(a.prediction_logits, b.prediction_logits)
    assert torch.equal(a.seq_relationship_logits, b.seq_relationship_logits)


def test_bert_preset_onto_a_bare_bert_model_reports_the_heads_as_unexpected(bert_checkpoint):
    torch, transformers, tf = _frameworks()
    import gpuckpt.torch as gt

    config = _bert_config(transformers)
    theirs = transformers.BertForPreTraining(config)
    transformers.models.bert.modeling_bert.load_tf_weights_in_bert(theirs, config, bert_checkpoint)
    ours = transformers.BertModel(config)
    with pytest.raises(gt.LoadError, match="unexpected: cls.predictions"):
        gt.load_into(ours, bert_checkpoint, mapping="bert")
    result = gt.load_into(ours, bert_checkpoint, mapping="bert", strict=False)
    assert sorted(result.unexpected_keys) == sorted(
        [
            "cls.predictions.transform.dense.weight",
            "cls.predictions.transform.dense.bias",
            "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.transform.LayerNorm.bias",
            "cls.predictions.bias",
            "cls.seq_relationship.weight",
            "cls.seq_relationship.bias",
        ]
    )
    assert result.missing_keys == [] and result.mismatched_keys == [] and result.unmapped_keys == []
    _assert_state_dicts_equal(torch, ours, theirs.bert)
    ours.eval(), _same_layout(torch, theirs)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).last_hidden_state, theirs.bert(input_ids=ids).last_hidden_state)


def test_bert_model_from_a_base_only_checkpoint_and_unmapped_names(tmp_path):
    torch, transformers, tf = _frameworks()
    import gpuckpt.torch as gt

    arrays = _bert_arrays(np.random.default_rng(7), heads=False)
    prefix = _tf_v1_save(tf, str(tmp_path / "base.ckpt"), arrays)
    config = _bert_config(transformers)
    theirs = transformers.BertModel(config)
    transformers.models.bert.modeling_bert.load_tf_weights_in_bert(theirs, config, prefix)
    ours = transformers.BertModel(config)
    assert gt.load_into(ours, prefix, mapping="bert").ok
    _assert_state_dicts_equal(torch, ours, theirs)

    arrays["bert/encoder/layer_0/attention/self/rel_bias"] = np.zeros(3, np.float32)  # a name no rule knows
    odd = _tf_v1_save(tf, str(tmp_path / "odd.ckpt"), arrays)
    with pytest.raises(gt.LoadError, match="unmapped checkpoint names: bert/encoder/layer_0/attention/self/rel_bias"):
        gt.load_into(transformers.BertModel(config), odd, mapping="bert")
    result = gt.load_into(transformers.BertModel(config), odd, mapping="bert", strict=False)
    assert result.unmapped_keys == ["bert/encoder/layer_0/attention/self/rel_bias"]


def test_electra_preset_equals_transformers_load_tf_weights_in_electra(tmp_path, capsys):
    torch, transformers, tf = _frameworks()
    import gpuckpt.torch as gt

    rng = np.random.default_rng(12)
    h, e = BERT["hidden"], 16
    arrays = {
        name.replace("bert/", "electra/"): value
        for name, value in _bert_arrays(rng, heads=False).items()
        if not name.startswith("bert/pooler")
    }
    arrays["electra/embeddings/word_embeddings"] = rng.standard_normal((BERT["vocab"], e)).astype(np.float32)
    arrays["electra/embeddings/position_embeddings"] = rng.standard_normal((BERT["positions"], e)).astype(np.float32)
    arrays["electra/embeddings/token_type_embeddings"] = rng.standard_normal((BERT["types"], e)).astype(np.float32)
    arrays["electra/embeddings/LayerNorm/gamma"] = rng.standard_normal(e).astype(np.float32)
    arrays["electra/embeddings/LayerNorm/beta"] = rng.standard_normal(e).astype(np.float32)
    arrays["electra/embeddings_project/kernel"] = rng.standard_normal((e, h)).astype(np.float32)
    arrays["electra/embeddings_project/bias"] = rng.standard_normal(h).astype(np.float32)
    arrays["discriminator_predictions/dense/kernel"] = rng.standard_normal((h, h)).astype(np.float32)
    arrays["discriminator_predictions/dense/bias"] = rng.standard_normal(h).astype(np.float32)
    arrays["discriminator_predictions/dense_1/kernel"] = rng.standard_normal((h, 1)).astype(np.float32)
    arrays["discriminator_predictions/dense_1/bias"] = rng.standard_normal(1).astype(np.float32)
    arrays["generator/encoder/layer_0/output/dense/bias"] = np.zeros(h, np.float32)  # the generator: skipped
    arrays["generator_predictions/output_bias"] = np.zeros(BERT["vocab"], np.float32)
    prefix = _tf_v1_save(tf, str(tmp_path / "electra.ckpt"), arrays)
    config = transformers.ElectraConfig(
        vocab_size=BERT["vocab"],
        embedding_size=e,
        hidden_size=h,
        num_hidden_layers=BERT["layers"],
        num_attention_heads=BERT["heads"],
        intermediate_size=BERT["intermediate"],
        max_position_embeddings=BERT["positions"],
        type_vocab_size=BERT["types"],
    )
    torch.manual_seed(0)
    theirs = transformers.ElectraForPreTraining(config)
    transformers.models.electra.modeling_electra.load_tf_weights_in_electra(theirs, config, prefix, "discriminator")
    capsys.readouterr()  # it prints a line per tensor
    torch.manual_seed(1)
    ours = transformers.ElectraForPreTraining(config)
    result = gt.load_into(ours, prefix, mapping="electra")
    assert result.ok, result.describe()
    assert result.skipped["generator_predictions/output_bias"] == "the ELECTRA generator, a separate model"
    _assert_state_dicts_equal(torch, ours, theirs)
    ours.eval(), _same_layout(torch, theirs)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    bare = transformers.ElectraModel(config)
    assert sorted(gt.load_into(bare, prefix, mapping="electra", strict=False).unexpected_keys) == [
        "discriminator_predictions.dense.bias",
        "discriminator_predictions.dense.weight",
        "discriminator_predictions.dense_prediction.bias",
        "discriminator_predictions.dense_prediction.weight",
    ]
    _assert_state_dicts_equal(torch, bare, theirs.electra)


def test_albert_preset_equals_transformers_load_tf_weights_in_albert(tmp_path, capsys):
    torch, transformers, tf = _frameworks()
    import gpuckpt.torch as gt

    rng = np.random.default_rng(21)
    v, e, h, i = BERT["vocab"], 16, BERT["hidden"], BERT["intermediate"]
    shapes = {
        "bert/embeddings/word_embeddings": (v, e),
        "bert/embeddings/position_embeddings": (BERT["positions"], e),
        "bert/embeddings/token_type_embeddings": (BERT["types"], e),
        "bert/embeddings/LayerNorm/gamma": (e,),
        "bert/embeddings/LayerNorm/beta": (e,),
        "bert/encoder/embedding_hidden_mapping_in/kernel": (e, h),
        "bert/encoder/embedding_hidden_mapping_in/bias": (h,),
        "bert/pooler/dense/kernel": (h, h),
        "bert/pooler/dense/bias": (h,),
        "cls/predictions/transform/dense/kernel": (h, e),
        "cls/predictions/transform/dense/bias": (e,),
        "cls/predictions/transform/LayerNorm/gamma": (e,),
        "cls/predictions/transform/LayerNorm/beta": (e,),
        "cls/predictions/output_bias": (v,),
        "cls/seq_relationship/output_weights": (2, h),
        "cls/seq_relationship/output_bias": (2,),
    }
    inner = "bert/encoder/transformer/group_0/inner_group_0"
    for part in ("query", "key", "value"):
        shapes[f"{inner}/attention_1/self/{part}/kernel"] = (h, h)
        shapes[f"{inner}/attention_1/self/{part}/bias"] = (h,)
    shapes.update(
        {
            f"{inner}/attention_1/output/dense/kernel": (h, h),
            f"{inner}/attention_1/output/dense/bias": (h,),
            f"{inner}/LayerNorm/gamma": (h,),
            f"{inner}/LayerNorm/beta": (h,),
            f"{inner}/ffn_1/intermediate/dense/kernel": (h, i),
            f"{inner}/ffn_1/intermediate/dense/bias": (i,),
            f"{inner}/ffn_1/intermediate/output/dense/kernel": (i, h),
            f"{inner}/ffn_1/intermediate/output/dense/bias": (h,),
            f"{inner}/LayerNorm_1/gamma": (h,),
            f"{inner}/LayerNorm_1/beta": (h,),
        }
    )
    arrays = {name: (rng.standard_normal(shape) * 0.2).astype(np.float32) for name, shape in shapes.items()}
    arrays[f"{inner}/ffn_1/intermediate/dense/kernel/adam_m"] = np.zeros((h, i), np.float32)
    arrays["global_step"] = np.int64(3)
    prefix = _tf_v1_save(tf, str(tmp_path / "albert.ckpt"), arrays)
    config = transformers.AlbertConfig(
        vocab_size=v,
        embedding_size=e,
        hidden_size=h,
        num_hidden_layers=2,
        num_attention_heads=BERT["heads"],
        intermediate_size=i,
        max_position_embeddings=BERT["positions"],
        type_vocab_size=BERT["types"],
    )
    torch.manual_seed(0)
    theirs = transformers.AlbertForPreTraining(config)
    transformers.models.albert.modeling_albert.load_tf_weights_in_albert(theirs, config, prefix)
    capsys.readouterr()  # it prints every name
    torch.manual_seed(1)
    ours = transformers.AlbertForPreTraining(config)
    result = gt.load_into(ours, prefix, mapping="albert")
    assert result.ok, result.describe()
    _assert_state_dicts_equal(torch, ours, theirs)
    ours.eval(), _same_layout(torch, theirs)
    ids = torch.tensor([[7, 1, 3, 98, 45, 2]])
    with torch.no_grad():
        a, b = ours(input_ids=ids), theirs(input_ids=ids)
    assert torch.equal(a.prediction_logits, b.prediction_logits) and torch.equal(a.sop_logits, b.sop_logits)


GPT2 = {"vocab": 99, "positions": 16, "embd": 32, "layers": 2, "heads": 4}


def _gpt2_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The variables of openai/gpt-2's src/model.py (Conv1D kernels [1, nx, nf])."""
    e = GPT2["embd"]
    shapes: dict[str, tuple[int, ...]] = {"model/wpe": (GPT2["positions"], e), "model/wte": (GPT2["vocab"], e)}
    for n in range(GPT2["layers"]):
        p = f"model/h{n}"
        shapes.update(
            {
                f"{p}/ln_1/g": (e,),
                f"{p}/ln_1/b": (e,),
                f"{p}/attn/c_attn/w": (1, e, 3 * e),
                f"{p}/attn/c_attn/b": (3 * e,),
                f"{p}/attn/c_proj/w": (1, e, e),
                f"{p}/attn/c_proj/b": (e,),
                f"{p}/ln_2/g": (e,),
                f"{p}/ln_2/b": (e,),
                f"{p}/mlp/c_fc/w": (1, e, 4 * e),
                f"{p}/mlp/c_fc/b": (4 * e,),
                f"{p}/mlp/c_proj/w": (1, 4 * e, e),
                f"{p}/mlp/c_proj/b": (e,),
            }
        )
    shapes["model/ln_f/g"] = (e,)
    shapes["model/ln_f/b"] = (e,)
    return {name: (rng.standard_normal(shape) * 0.2).astype(np.float32) for name, shape in shapes.items()}


def test_gpt2_preset_equals_transformers_load_tf_weights_in_gpt2(tmp_path):
    torch, transformers, tf = _frameworks()
    import gpuckpt.torch as gt

    prefix = _tf_v1_save(tf, str(tmp_path / "model.ckpt"), _gpt2_arrays(np.random.default_rng(5)))
    config = transformers.GPT2Config(
        vocab_size=GPT2["vocab"],
        n_positions=GPT2["positions"],
        n_embd=GPT2["embd"],
        n_layer=GPT2["layers"],
        n_head=GPT2["heads"],
    )
    torch.manual_seed(0)
    theirs = transformers.GPT2Model(config)
    transformers.models.gpt2.modeling_gpt2.load_tf_weights_in_gpt2(theirs, config, prefix)
    torch.manual_seed(1)
    ours = transformers.GPT2Model(config)
    pointer = ours.h[0].attn.c_attn.weight.data_ptr()
    result = gt.load_into(ours, prefix, mapping="gpt2")
    assert result.ok, result.describe()
    assert ours.h[0].attn.c_attn.weight.data_ptr() == pointer  # squeezed straight into the parameter
    _assert_state_dicts_equal(torch, ours, theirs)
    ours.eval(), _same_layout(torch, theirs)
    ids = torch.tensor([[5, 3, 98, 0, 12, 44]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).last_hidden_state, theirs(input_ids=ids).last_hidden_state)

    # the LM-head class: the same names under its "transformer." base, lm_head tied to wte
    head = transformers.GPT2LMHeadModel(config)
    assert gt.load_into(head, prefix, mapping="gpt2").ok
    _assert_state_dicts_equal(torch, head.transformer, theirs)
    assert head.lm_head.weight.data_ptr() == head.transformer.wte.weight.data_ptr()


# -- gpuckpt convert -------------------------------------------------------------------------------------


def _read_safetensors(path):
    """A safetensors file parsed by hand (header, then each tensor's bytes), independent of our writer."""
    with open(path, "rb") as f:
        data = f.read()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    assert (8 + length) % 8 == 0
    body = data[8 + length :]
    return header, body


def test_convert_without_a_framework_writes_the_renamed_transformed_tensors(tmp_path):
    import ml_dtypes

    rng = np.random.default_rng(1)
    tensors = {
        "net/fc/kernel": rng.standard_normal((2, 3)).astype(np.float32),
        "net/fc/bias": rng.standard_normal(3).astype(ml_dtypes.bfloat16),
        "net/conv/w": rng.standard_normal((1, 4, 2)).astype(np.float16),
        "global_step": np.int64(9),
        "net/fc/kernel/Adam": np.zeros((2, 3), np.float32),
    }
    prefix = gpuckpt.save(str(tmp_path / "ckpt"), tensors)
    m = NameMap(
        [
            skip(kinds=NOT_MODEL_KINDS),
            rule(r"net/(\w+)/kernel", r"\1.weight", transpose=True),
            rule(r"net/(\w+)/bias", r"\1.bias"),
            rule(r"net/(\w+)/w", r"\1.weight", reshape=SQUEEZE, dtype="float32"),
        ]
    )
    out = tmp_path / "out.safetensors"
    result = gpuckpt.mapping.convert(prefix, out, m)
    assert result.written == {"conv.weight": "net/conv/w", "fc.bias": "net/fc/bias", "fc.weight": "net/fc/kernel"}
    assert set(result.skipped) == {"global_step", "net/fc/kernel/Adam"} and result.unmapped == []
    header, body = _read_safetensors(out)
    expected = {
        "conv.weight": ("F32", tensors["net/conv/w"].reshape(4, 2).astype(np.float32)),
        "fc.bias": ("BF16", tensors["net/fc/bias"]),
        "fc.weight": ("F32", tensors["net/fc/kernel"].T),
    }
    assert set(header) == set(expected)
    for name, (dtype, array) in expected.items():
        begin, end = header[name]["data_offsets"]
        assert header[name]["dtype"] == dtype and header[name]["shape"] == list(array.shape)
        assert body[begin:end] == np.ascontiguousarray(array).tobytes(), name

    prefix2 = gpuckpt.save(str(tmp_path / "more"), {**tensors, "net/other": np.zeros(2, np.float32)})
    with pytest.raises(gpuckpt.InvalidArgumentError, match="no rule maps net/other"):
        gpuckpt.mapping.convert(prefix2, tmp_path / "refused.safetensors", m)
    assert not (tmp_path / "refused.safetensors").exists()
    assert gpuckpt.mapping.convert(prefix2, tmp_path / "x.safetensors", m, allow_unmapped=True).unmapped == [
        "net/other"
    ]


def test_cli_convert_bert_safetensors_loads_into_transformers_equal_to_its_loader(bert_checkpoint, tmp_path, capsys):
    torch, transformers, tf = _frameworks()
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from gpuckpt.cli import main

    out = tmp_path / "bert.safetensors"
    assert main(["convert", bert_checkpoint, str(out), "--preset", "bert"]) == 0
    assert "tensors" in capsys.readouterr().out
    assert main(["convert", bert_checkpoint, str(out), "--preset", "bert"]) == 1  # exists
    config = _bert_config(transformers)
    theirs = transformers.BertForPreTraining(config)
    transformers.models.bert.modeling_bert.load_tf_weights_in_bert(theirs, config, bert_checkpoint)
    ours = transformers.BertForPreTraining(config)
    missing, unexpected = ours.load_state_dict(safetensors_torch.load_file(str(out)), strict=False)
    assert sorted(missing) == ["cls.predictions.decoder.bias", "cls.predictions.decoder.weight"]  # tied
    assert unexpected == []
    _assert_state_dicts_equal(torch, ours, theirs)

    pt = tmp_path / "bert.pt"
    assert main(["convert", bert_checkpoint, str(pt), "--preset", "bert"]) == 0
    state = torch.load(str(pt))
    for name, tensor in safetensors_torch.load_file(str(out)).items():
        assert torch.equal(_bits(torch, state[name]), _bits(torch, tensor)), name


def test_cli_convert_to_pt_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    """A .pt output is written beside OUT and renamed over it: a write that fails part-way leaves
    the old file as it was and no temporary behind."""
    torch = pytest.importorskip("torch")
    from gpuckpt.cli import main

    prefix = gpuckpt.save(str(tmp_path / "c"), {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"rules": [{"match": "w", "to": "w.weight"}]}))
    out = tmp_path / "o.pt"
    out.write_bytes(b"the user's file")
    real_save = torch.save

    def fails_part_way(obj, f, *args, **kwargs):
        f.write(b"half a state dict")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", fails_part_way)
    assert main(["convert", prefix, str(out), "--map", str(rules), "--overwrite"]) != 0
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_bytes() == b"the user's file"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["c.index", "c.data-00000-of-00001", "rules.json", "o.pt"])
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["convert", prefix, str(out), "--map", str(rules), "--overwrite"]) == 0
    assert torch.load(str(out))["w.weight"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_cli_convert_map_file_and_usage(tmp_path, capsys):
    from gpuckpt.cli import main

    prefix = gpuckpt.save(str(tmp_path / "c"), {"a/w": np.ones((2, 1), np.float32), "b": np.zeros(1, np.int32)})
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"rules": [{"match": "a/w", "to": "a.weight", "transpose": True}]}))
    out = tmp_path / "o.safetensors"
    assert main(["convert", prefix, str(out), "--map", str(rules)]) == 2  # b is unmapped: InvalidArgumentError
    assert "no rule maps b" in capsys.readouterr().err
    assert main(["convert", prefix, str(out), "--map", str(rules), "--allow-unmapped"]) == 0
    assert "left out (no rule maps it): b" in capsys.readouterr().err
    header, _ = _read_safetensors(out)
    assert header["a.weight"]["shape"] == [1, 2]
    assert main(["convert", prefix, str(out), "--preset", "bert", "--map", str(rules)]) == 2
    rules.write_text("[")
    assert main(["convert", prefix, str(tmp_path / "p.safetensors"), "--map", str(rules)]) == 2


def test_a_scalar_stays_a_scalar_through_convert(tmp_path):
    """A 0-d tensor (a learned temperature, a scale) keeps shape (): numpy's ascontiguousarray
    would make it (1,)."""
    prefix = gpuckpt.save(str(tmp_path / "s"), {"net/temperature": np.float32(0.07), "net/w": np.ones(2, np.float32)})
    out = tmp_path / "s.safetensors"
    gpuckpt.mapping.convert(prefix, out, NameMap([rule(r"net/(\w+)", r"\1", dtype="float16")]))
    header, body = _read_safetensors(out)
    assert header["temperature"]["shape"] == [] and header["temperature"]["dtype"] == "F16"
    begin, end = header["temperature"]["data_offsets"]
    assert body[begin:end] == np.float16(0.07).tobytes()


def test_a_rule_with_a_type_that_is_not_one_is_refused_when_written():
    with pytest.raises(gpuckpt.InvalidArgumentError, match="no_such_type"):
        rule("w", "w", dtype="no_such_type")


def test_convert_refuses_a_tensor_named_metadata_and_an_existing_file(tmp_path):
    prefix = gpuckpt.save(str(tmp_path / "m"), {"b": np.ones(2, np.float32)})
    with pytest.raises(gpuckpt.InvalidArgumentError, match="__metadata__"):
        gpuckpt.mapping.convert(prefix, tmp_path / "m.safetensors", {"b": "__metadata__"})
    out = tmp_path / "kept.safetensors"
    out.write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        gpuckpt.mapping.convert(prefix, out, {"b": "b"})
    assert out.read_bytes() == b"mine"
    gpuckpt.mapping.convert(prefix, out, {"b": "b"}, overwrite=True)
    assert _read_safetensors(out)[0]["b"]["shape"] == [2]


def test_a_rule_may_name_numpys_own_types_and_ml_dtypes(tmp_path):
    """ "bool" is numpy's dtype name even where the numpy module has no ``np.bool`` (NumPy 1.26)."""
    for name in ("bool", "float32", "int8", "bfloat16", "float8_e4m3fn", "int4"):
        assert rule("w", "w", dtype=name).dtype == name
    prefix = gpuckpt.save(str(tmp_path / "b"), {"w": np.array([0, 2, 0], np.int32)})
    out = tmp_path / "b.safetensors"
    gpuckpt.mapping.convert(prefix, out, NameMap([rule("w", "w", dtype="bool")]))
    header, body = _read_safetensors(out)
    begin, end = header["w"]["data_offsets"]
    assert header["w"]["dtype"] == "BOOL" and body[begin:end] == bytes([0, 1, 0])


def test_a_rules_conversion_depends_on_the_type_not_its_spelling(tmp_path):
    """ "half", "f2", np.float16 and "float16" are one type: the same rounding rule (the project's,
    as dtype= on restores) and the same refusals, whichever is written."""
    import ml_dtypes

    for spelled in ("half", "f2", np.float16, "float16"):
        assert rule("w", "w", dtype=spelled).dtype == "float16"
    assert rule("w", "w", dtype=float).dtype == "float64"
    values = {
        "e5": np.frombuffer(bytes([0x7D, 0xFE, 0x01]), ml_dtypes.float8_e5m2),  # NaNs with payloads, a subnormal
        "fz": np.array([0.5], ml_dtypes.float8_e4m3fnuz),
    }
    prefix = gpuckpt.save(str(tmp_path / "c"), values)
    results = {}
    for spelled in ("float16", "half", "f2", np.float16):
        out = tmp_path / f"e5-{spelled if isinstance(spelled, str) else 'np'}.safetensors"
        gpuckpt.mapping.convert(prefix, out, NameMap([rule("e5", "e5", dtype=spelled), skip("fz")]))
        header, body = _read_safetensors(out)
        begin, end = header["e5"]["data_offsets"]
        results[str(spelled)] = body[begin:end]
    assert len(set(results.values())) == 1, results
    for spelled in ("float32", "f4", "single"):
        with pytest.raises(gpuckpt.UnsupportedError, match="no conversion from float8_e4m3fnuz"):
            gpuckpt.mapping.convert(
                prefix, tmp_path / "fz.safetensors", NameMap([rule("fz", "fz", dtype=spelled), skip("e5")])
            )
