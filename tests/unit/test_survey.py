"""The survey before encoding (pretrain/survey.py): what units send back merges into exactly the sample, the val cut
and the duplicates that one serial pass over the whole corpus gives, for any unit boundaries and seed."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmforge.data.sources import doc_hash, hash_fraction, sample_fraction
from pretrain.survey import Seen, Survey, Wants, load_result, save_result, seed_for, survey_docs


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


def surveyed(texts: list[str], wants: Wants, bounds: list[int], seed: int, shuffle: bool = False) -> Survey:
    """The survey over units cut at `bounds` as tokenize runs it: the sample's and the cut's parts merged in any
    order (`shuffle`, merging val positions at every unit: val_limit falls), the dedup keys in unit order; the sample
    again with a higher seed until it is complete."""
    units = list(enumerate(zip([0, *bounds], [*bounds, len(texts)], strict=True)))
    survey, sample_only = Survey(wants, limit=seed, seed=seed, val_batch=1 if shuffle else 2**16), False
    while True:
        order = random.Random(len(units)).sample(units, len(units)) if shuffle else units
        batches = {}
        for unit, (start, end) in order:
            batches[unit] = survey_docs(texts[start:end], wants, survey.limit, survey.val_limit, sample_only)
            survey.add(unit, batches[unit])
        if wants.dedup and not sample_only:
            for unit, _ in units:
                survey.keys(unit, batches[unit]["keys"])
        if survey.complete():
            return survey
        survey.again()
        sample_only = True


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
      for shuffle in (False, True):
        survey = surveyed(texts, wants, bounds, seed, shuffle)
        assert survey.sample(survey.val_cut()) == sample
        assert survey.val_cut() == cut and survey.count == count
        if dedup:
            starts = [0, *bounds]
            found = sorted(starts[unit] + int(place) for unit, places in survey.drops.items() for place in places)
            assert found == drops


def test_a_low_seed_is_raised_until_the_sample_fills_and_the_limit_falls_as_it_fills():
    texts = corpus(300, seed=2)
    wants = Wants(sample_bytes=20_000, val_fraction=0.0, val_docs=0, dedup=False)
    low = Survey(wants, limit=2**40, seed=2**40)
    low.add(0, survey_docs(texts, wants, low.limit))
    assert not low.complete()  # nothing below 2**40 / 2**64: raise the seed
    low.again()
    assert low.seed > 2**41 and low.limit == low.seed and not low.kept
    full = Survey(wants)
    for unit in range(0, len(texts), 10):
        full.add(unit, survey_docs(texts[unit:unit + 10], wants, full.limit))
    assert full.complete() and full.overflowed and full.limit < 2**64 // 2  # ~20 KB of ~3 MB: a low boundary
    assert 0 < len(full.kept) < len(texts) // 4


def test_the_seen_keys_find_exactly_the_repeats_a_set_finds():
    rng = np.random.default_rng(0)
    seen, reference = Seen(), set()
    for size in [0, 1, 5, 1000, 3, 20_000, 7, 4096] * 6:
        keys = rng.integers(0, 50_000, size=size, dtype=np.uint64)  # repeats within and across units
        expected = []
        for place, key in enumerate(keys.tolist()):
            if key in reference:
                expected.append(place)
            reference.add(key)
        assert seen.drops(keys).tolist() == expected
    assert len(seen) == len(reference) and len(seen.runs) <= 17  # merged like a binary counter: log2 runs


def test_the_kept_result_reads_back_only_for_its_plan(tmp_path):
    drops = {0: np.array([3, 9], dtype=np.int64), 1: np.array([], dtype=np.int64), 7: np.array([0], dtype=np.int64)}
    save_result(tmp_path / "survey.npz", "plan-a", 0.0123, drops, 1000)
    cut, back = load_result(tmp_path / "survey.npz", "plan-a")
    assert cut == 0.0123 and {k: v.tolist() for k, v in back.items()} == {0: [3, 9], 1: [], 7: [0]}
    assert load_result(tmp_path / "survey.npz", "plan-b") is None and load_result(tmp_path / "none.npz", "x") is None
    save_result(tmp_path / "big.npz", "p", 0.5, {0: np.array([5, 2**32 + 7])}, 2**33)  # a unit of 4e9 documents
    assert load_result(tmp_path / "big.npz", "p")[1][0].tolist() == [5, 2**32 + 7]
