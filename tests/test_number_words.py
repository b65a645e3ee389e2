"""The English → German number-words data: tokens, segmentation, vocabularies, a deterministic
split and the teacher-forcing layout (PAPERS.md §14.2's offline stand-in for IWSLT)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("num2words")

from num2words import num2words  # noqa: E402

from optbrain.data.number_words import (  # noqa: E402
    BOS,
    EOS,
    PAD,
    Vocab,
    english_tokens,
    german_tokens,
    load_number_translation,
    segment,
)

SMALL = dict(n_max=999, sizes=(300, 50, 80))


def test_tokens_reorder_units_before_tens():
    assert english_tokens(324) == ("three", "hundred", "and", "twenty", "four")
    assert german_tokens(324) == ("drei", "hundert", "vier", "und", "zwanzig")
    assert german_tokens(21) == ("ein", "und", "zwanzig")
    assert german_tokens(1001) == ("ein", "tausend", "eins")
    assert german_tokens(17) == ("siebzehn",)  # longest match: not sieb + zehn
    assert english_tokens(1984) == ("one", "thousand", "nine", "hundred", "and", "eighty", "four")


def test_german_morphemes_join_back_to_num2words_for_every_number_below_ten_thousand():
    for n in range(1, 10_000, 7):
        assert "".join(german_tokens(n)) == num2words(n, lang="de").replace(" ", "").lower()


def test_segment_refuses_what_is_not_a_number_word():
    with pytest.raises(ValueError, match="cannot split"):
        segment("dreihundertxyz")
    with pytest.raises(ValueError, match="numbers must be"):
        german_tokens(0)


def test_split_is_deterministic_disjoint_and_of_the_asked_sizes():
    a, b = load_number_translation(**SMALL), load_number_translation(**SMALL)
    assert a.numbers == b.numbers
    for split in ("train", "valid", "test"):
        assert torch.equal(a.src[split], b.src[split])
        assert torch.equal(a.tgt_out[split], b.tgt_out[split])
    sets = [set(a.numbers[s]) for s in ("train", "valid", "test")]
    assert [len(s) for s in sets] == [300, 50, 80]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert all(1 <= n <= 999 for s in sets for n in s)
    other = load_number_translation(**SMALL, seed=1)
    assert other.numbers["train"] != a.numbers["train"]


def test_vocabularies_and_the_teacher_forcing_layout():
    d = load_number_translation(**SMALL)
    for v in (d.src_vocab, d.tgt_vocab):
        assert v.tokens[:3] == ("<pad>", "<s>", "</s>")
        assert list(v.tokens[3:]) == sorted(v.tokens[3:])
    for split in ("train", "valid", "test"):
        src, tin, tout = d.src[split], d.tgt_in[split], d.tgt_out[split]
        assert src.shape == (len(d.numbers[split]), d.src_len)
        assert tin.shape == tout.shape == (len(d.numbers[split]), d.tgt_len)
        assert (tin[:, 0] == BOS).all()
        for i, n in enumerate(d.numbers[split]):
            words = german_tokens(n)
            assert d.src_vocab.decode(src[i]) == list(english_tokens(n))
            assert d.tgt_vocab.decode(tout[i]) == list(words)
            k = len(words)
            assert tout[i, k] == EOS and (tout[i, k + 1 :] == PAD).all()
            assert torch.equal(tin[i, 1 : k + 1], tout[i, :k])  # shifted by one
        assert d.inputs(split).shape == (len(d.numbers[split]), d.src_len + d.tgt_len)
    assert d.references("test")[0] == " ".join(german_tokens(d.numbers["test"][0]))


def test_vocab_errors_name_the_word():
    v = Vocab.build([("a", "b")])
    assert v.decode(v.encode(["b", "a"]) + [EOS, 3]) == ["b", "a"]
    with pytest.raises(KeyError, match="zz"):
        v.encode(["zz"])


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(n_max=0), "n_max"),
        (dict(n_max=100, sizes=(80, 20, 10)), "need 110"),
        (dict(n_max=100, sizes=(10, 0, 10)), "positive"),
    ],
)
def test_bad_settings_are_refused(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        load_number_translation(**kwargs)
