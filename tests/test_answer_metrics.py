"""EM and F1 of generated answers: SQuAD v1.1's and DROP's official definitions, on hand-checked pairs."""

import pytest

from zoflat_cli.data.answers import drop_pair, drop_scores, squad_scores


@pytest.mark.parametrize("prediction,references,em,f1", [
    ("Denver Broncos", ["Denver Broncos"], 1.0, 1.0),
    ("the Denver Broncos!", ["Denver Broncos"], 1.0, 1.0),  # articles and punctuation go
    ("  denver   broncos ", ["Denver Broncos"], 1.0, 1.0),  # case and whitespace
    ("Broncos", ["Denver Broncos"], 0.0, 2 * 1.0 * 0.5 / 1.5),  # precision 1, recall 1/2
    ("Carolina Panthers", ["Denver Broncos", "Panthers"], 0.0, 2 * 0.5 * 1.0 / 1.5),  # best reference
    ("an apple", ["The apple"], 1.0, 1.0),
    ("", ["x"], 0.0, 0.0),
])
def test_squad_em_f1(prediction, references, em, f1):
    assert squad_scores(prediction, references) == pytest.approx((em, f1))


@pytest.mark.parametrize("prediction,gold,em,f1", [
    ("1,000", "1000", 1.0, 1.0),  # numbers compare as floats
    ("3 yards", "3", 0.0, 0.67),  # bag F1 2·(1/2)·1/(3/2), rounded to 2 places
    ("4", "3", 0.0, 0.0),  # the gold number must appear
    ("the Jets", "Jets", 1.0, 1.0),
    ("well-known", "well known", 1.0, 1.0),  # hyphens split tokens
    (["Smith", "Jones"], ["Jones", "Smith"], 1.0, 1.0),  # multi-span, aligned one-to-one
    (["Smith"], ["Jones", "Smith"], 0.0, 0.5),  # one of two spans: the other scores 0
])
def test_drop_em_f1(prediction, gold, em, f1):
    assert drop_pair(prediction, gold) == pytest.approx((em, f1))


def test_drop_takes_the_best_reference():
    assert drop_scores("7", ["6", "7"]) == (1.0, 1.0)
