"""per_layer: routing by regex on leaf paths."""

from __future__ import annotations

import warnings

import chex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

GRADS = {
    "encoder": {"layers": [{"kernel": jnp.array([3.0, 4.0]), "bias": jnp.array([2.0])}]},
    "head": {"kernel": jnp.array([6.0, 8.0]), "bias": jnp.array([-0.5])},
}


def _apply(tx, grads=GRADS):
    return tx.update(grads, tx.init(grads), grads)


def test_first_matching_rule_wins_and_default_takes_the_rest(maybe_jit):
    tx = oc.per_layer(
        {r".*/bias": oc.clip_by_value(0.1), r"encoder/.*": oc.clip_by_global_norm(1.0)},
        default=oc.clip_by_leaf_norm(5.0),
    )
    out, state = maybe_jit(tx.update)(GRADS, tx.init(GRADS), GRADS)
    np.testing.assert_allclose(out["encoder"]["layers"][0]["bias"], [0.1])
    np.testing.assert_allclose(out["head"]["bias"], [-0.1])
    np.testing.assert_allclose(out["encoder"]["layers"][0]["kernel"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(out["head"]["kernel"], [3.0, 4.0], rtol=1e-6)
    s = oc.stats(state)
    assert float(s["clip_by_global_norm/norm"]) == 5.0  # only the encoder kernel's group


def test_unmatched_leaves_pass_through_without_default():
    out, _ = _apply(oc.per_layer({r"head/kernel": oc.clip_by_leaf_norm(1.0)}))
    chex.assert_trees_all_equal(out["encoder"], GRADS["encoder"])
    chex.assert_trees_all_equal(out["head"]["bias"], GRADS["head"]["bias"])
    np.testing.assert_allclose(out["head"]["kernel"], [0.6, 0.8], rtol=1e-6)


def test_patterns_must_match_the_whole_path():
    with pytest.warns(
        UserWarning, match=r"patterns \['kernel'\] match no leaf .*encoder/layers/0/bias"
    ):
        out, _ = _apply(oc.per_layer({"kernel": oc.clip_by_leaf_norm(1.0)}))
    chex.assert_trees_all_equal(out, GRADS)


def test_rules_as_sequence_of_pairs():
    tx = oc.per_layer([(r".*kernel", oc.clip_by_leaf_norm(1.0)), (r".*", oc.clip_by_value(0.0))])
    out, _ = _apply(tx)
    np.testing.assert_allclose(out["head"]["kernel"], [0.6, 0.8], rtol=1e-6)
    chex.assert_trees_all_equal(out["head"]["bias"], jnp.array([0.0]))


def test_composes_in_chain_with_optimizer_state():
    tx = optax.chain(oc.per_layer({r".*bias": oc.clip_by_value(0.1)}), optax.sgd(1.0))
    out, _ = _apply(tx)
    np.testing.assert_allclose(out["head"]["bias"], [0.1])


def test_no_warning_on_an_empty_tree():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = _apply(oc.per_layer({"x": oc.clip_by_value(1.0)}), {})
    assert out == {}


def test_invalid_regex_is_rejected():
    with pytest.raises(ValueError, match=r"`rules` has an invalid regex '\(unclosed'"):
        oc.per_layer({"(unclosed": oc.clip_by_value(1.0)})


def test_non_transform_rule_is_rejected():
    with pytest.raises(
        TypeError, match=r"`rules\['.\*'\]` must be an optax.GradientTransformation.*got 1.0"
    ):
        oc.per_layer({".*": 1.0})


def test_non_mapping_rules_are_rejected():
    with pytest.raises(TypeError, match=r"`rules` must map regex strings to transformations"):
        oc.per_layer(oc.clip_by_value(1.0))


def test_non_string_pattern_is_rejected():
    with pytest.raises(TypeError, match=r"`rules` keys must be regex strings; got 3"):
        oc.per_layer({3: oc.clip_by_value(1.0)})
