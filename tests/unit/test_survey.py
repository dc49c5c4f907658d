"""The survey before encoding (pretrain/survey.py): what units send back merges into exactly the sample, the val cut
and the duplicates that one serial pass over the whole corpus gives, for any unit boundaries and seed."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmforge.data.sources import doc_hash, hash_fraction, sample_fraction
from pretrain.survey import Survey, Wants, seed_for, survey_docs


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = [f"document {i} " + "word " * rng.randint(1, 400) + ("é" * rng.randint(0, 50)) for i in range(n)]
    texts += [texts[rng.randrange(n)] for _ in range(n // 5)]  # exact duplicates, anywhere after their first copy
    rng.shuffle(texts)
    texts.append("z" * 300_000)  # one huge document
    return texts


def serial(texts: list[str], wants: Wants) -> tuple[list[str], float, int, list[int]]:
    """The reference: one pass over the corpus in order, as the main process did before the survey existed."""
    seen, drops, kept = set(), [], []
    for i, text in enumerate(texts):
        key = doc_hash(text.encode())[8:16]
        if wants.dedup and key in seen:
            drops.append(i)
            continue
        seen.add(key)
        kept.append(text)
    positions = sorted({hash_fraction(doc_hash(t.encode())) for t in kept} if wants.dedup
                       else [hash_fraction(doc_hash(t.encode())) for t in kept])
    cut = float(np.nextafter(positions[wants.val_docs - 1], 1.0)) if wants.val_docs else wants.val_fraction
    candidates = []
    for i, text in enumerate(kept):
        data = text.encode()
        if not wants.val_docs and hash_fraction(doc_hash(data)) < wants.val_fraction:
            continue
        cutoff = data[:wants.per_doc].decode("utf-8", errors="ignore")
        candidates.append((sample_fraction(doc_hash(data)), i, cutoff))
    total, sample = 0, []
    for _, i, text in sorted(candidates):
        total += len(text.encode())
        if total > wants.sample_bytes:
            break
        sample.append((i, text))
    sample = [t for i, t in sorted(sample) if hash_fraction(doc_hash(kept[i].encode())) >= cut]
    return sample, cut, len(kept), drops


def surveyed(texts: list[str], wants: Wants, bounds: list[int], seed: int) -> Survey:
    """The survey over units cut at `bounds`, again with a higher seed until it is complete (as tokenize does)."""
    while True:
        survey = Survey(wants, limit=seed, seed=seed)
        for unit, (start, end) in enumerate(zip([0, *bounds], [*bounds, len(texts)], strict=True)):
            survey.add(unit, survey_docs(texts[start:end], wants, survey.limit))
        if survey.complete():
            return survey
        seed = survey.next_seed()


@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("split", [{"val_fraction": 0.2, "val_docs": 0}, {"val_fraction": 0.0, "val_docs": 37}])
def test_any_units_and_any_seed_give_the_serial_passs_sample_cut_and_duplicates(dedup, split):
    texts = corpus(600)
    wants = Wants(sample_bytes=60_000, dedup=dedup, **split)
    sample, cut, count, drops = serial(texts, wants)
    assert 0.8 * 60_000 * (1 - 37 / count if wants.val_docs else 1) < sum(len(t.encode()) for t in sample) <= 60_000
    rng = random.Random(1)
    for bounds, seed in [([], 2**64), (list(range(1, len(texts))), 2**64),  # one unit; a unit per document
                         (sorted(rng.sample(range(1, len(texts)), 40)), 2**64),
                         (sorted(rng.sample(range(1, len(texts)), 40)), 2**50),  # a seed far too low: surveyed again
                         (sorted(rng.sample(range(1, len(texts)), 9)), seed_for(wants, 10 * 60_000))]:
        survey = surveyed(texts, wants, bounds, seed)
        assert survey.sample(survey.val_cut()) == sample
        assert survey.val_cut() == cut and survey.count == count
        if dedup:
            starts = [0, *bounds]
            found = sorted(starts[unit] + place for unit, places in survey.drops.items() for place in places)
            assert found == drops


def test_a_low_seed_is_raised_until_the_sample_fills_and_the_limit_falls_as_it_fills():
    texts = corpus(300, seed=2)
    wants = Wants(sample_bytes=20_000, val_fraction=0.0, val_docs=0, dedup=False)
    low = Survey(wants, limit=2**40, seed=2**40)
    low.add(0, survey_docs(texts, wants, low.limit))
    assert not low.complete() and low.next_seed() > 2**41  # nothing below 2**40 / 2**64: raise the seed
    full = Survey(wants)
    for unit in range(0, len(texts), 10):
        full.add(unit, survey_docs(texts[unit:unit + 10], wants, full.limit))
    assert full.complete() and full.overflowed and full.limit < 2**64 // 2  # ~20 KB of ~3 MB: a low boundary
    assert 0 < len(full.kept) < len(texts) // 4
