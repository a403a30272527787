"""Exact match and F1 of a generated answer against references, as the official scripts define them.

squad  SQuAD v1.1's evaluate-v1.1.py: lower-case, drop punctuation, drop the articles a/an/the,
       collapse whitespace; F1 over the bags of tokens; both the best over the references.
drop   DROP's drop_eval.py: tokens split on spaces and hyphens, each normalised as SQuAD's and
       numbers written as floats ("1,000" and "1000.0" match); F1 of the bags, aligned one-to-one
       by the Hungarian method, counts only where the gold numbers (if any) appear in the
       prediction; F1 rounded to 2 places; the best over the references.
"""

import re
import string
from collections import Counter

import numpy as np

PUNCTUATION = set(string.punctuation)
ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def _squad_normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def _token_f1(prediction: list, reference: list) -> float:
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, references) -> tuple:
    """(exact match, F1), each the maximum over the references."""
    predicted = _squad_normalize(prediction)
    em = max(float(predicted == _squad_normalize(r)) for r in references)
    f1 = max(_token_f1(predicted.split(), _squad_normalize(r).split()) for r in references)
    return em, f1


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _drop_token(token: str) -> str:
    token = token.lower()
    if not _is_number(token):
        token = "".join(ch for ch in token if ch not in PUNCTUATION)
    token = str(float(token)) if _is_number(token) else token
    return " ".join(ARTICLES.sub(" ", token).split())


def _drop_normalize(text: str) -> str:
    return " ".join(p for p in (_drop_token(t) for t in re.split(" |-", text)) if p.strip()).strip()


def _bags(answer) -> tuple:
    spans = [answer] if isinstance(answer, str) else list(answer)
    normalized = [_drop_normalize(s) for s in spans]
    return normalized, [set(n.split()) for n in normalized]


def _bag_f1(predicted: set, gold: set) -> float:
    common = len(gold & predicted)
    precision = 1.0 if not predicted else common / len(predicted)
    recall = 1.0 if not gold else common / len(gold)
    return 0.0 if precision == recall == 0.0 else 2 * precision * recall / (precision + recall)


def _numbers_match(gold: set, predicted: set) -> bool:
    gold_numbers = {w for w in gold if _is_number(w)}
    return not gold_numbers or bool(gold_numbers & {w for w in predicted if _is_number(w)})


def drop_pair(prediction, gold) -> tuple:
    """(exact match, F1) of one prediction against one gold answer (a span or a list of spans)."""
    from scipy.optimize import linear_sum_assignment

    predicted_spans, predicted_bags = _bags(prediction)
    gold_spans, gold_bags = _bags(gold)
    em = float(set(predicted_spans) == set(gold_spans) and len(predicted_spans) == len(gold_spans))
    scores = np.zeros((len(gold_bags), len(predicted_bags)))
    for g, gold_bag in enumerate(gold_bags):
        for p, predicted_bag in enumerate(predicted_bags):
            if _numbers_match(gold_bag, predicted_bag):
                scores[g, p] = _bag_f1(predicted_bag, gold_bag)
    best = np.zeros(max(len(gold_bags), len(predicted_bags)))
    for g, p in zip(*linear_sum_assignment(-scores)):
        best[g] = max(best[g], scores[g, p])
    return em, round(float(np.mean(best)), 2)


def drop_scores(prediction: str, references) -> tuple:
    pairs = [drop_pair(prediction, r) for r in references]
    return max(p[0] for p in pairs), max(p[1] for p in pairs)


SCORERS = {"squad": squad_scores, "drop": drop_scores}
