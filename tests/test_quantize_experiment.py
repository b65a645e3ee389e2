"""The quantise-transformer reproduction (quick run), its corpus and model."""

from __future__ import annotations

import json

import pytest
import torch

from optbrain import experiments
from optbrain.data.stdlib_text import (
    UNK,
    VOCAB_SIZE,
    decode,
    encode,
    load_stdlib_text,
    random_windows,
    split_of,
    stdlib_files,
    windows,
)
from optbrain.experiments import apply_overrides
from optbrain.experiments.quantise_transformer import Config, method_names
from optbrain.models.transformer import CharTransformer, SequenceCrossEntropy, TransformerConfig

pytest.importorskip("matplotlib")


# ------------------------------------------------------------------------- corpus
def test_split_is_fixed_by_file_and_deterministic():
    files = stdlib_files()
    assert files and not any(f.split("/")[0] in ("test", "tests") for f in files)
    splits = [split_of(f) for f in files]
    assert {"train", "val", "test"} <= set(splits)
    assert 0.8 < splits.count("train") / len(files) < 0.97
    a = load_stdlib_text({"train": 50_000, "val": 5_000, "test": 20_000})
    b = load_stdlib_text({"train": 50_000, "val": 5_000, "test": 20_000})
    assert a.digest == b.digest and torch.equal(a.test, b.test)
    assert set(a.files["train"]).isdisjoint(a.files["test"])
    assert all(split_of(f) == "test" for f in a.files["test"])
    assert a.train.numel() <= 50_000 and a.test.dtype == torch.uint8
    with pytest.raises(ValueError, match="unknown splits"):
        load_stdlib_text({"training": 10})


def test_encoding_round_trip_and_windows():
    text = "def f(x):\n\treturn x  # é€"
    ids = encode(text)
    assert int(ids.max()) < VOCAB_SIZE and (ids == UNK).sum() == 2
    assert decode(ids) == text.replace("é", "\ufffd").replace("€", "\ufffd")
    x, y = windows(ids, 5)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x.reshape(-1)[1:], y.reshape(-1)[:-1])
    xr, yr = random_windows(ids, 3, 4, torch.Generator().manual_seed(0))
    assert xr.shape == (3, 4) and torch.equal(xr[:, 1:], yr[:, :-1])
    with pytest.raises(ValueError, match="shorter"):
        windows(ids, 100)


def test_transformer_is_causal_and_uses_linear_projections():
    model = CharTransformer(TransformerConfig(vocab=30, context=10, width=16, layers=2, heads=4), 0)
    x = torch.randint(0, 30, (2, 10))
    x2 = x.clone()
    x2[:, 6:] = (x2[:, 6:] + 1) % 30
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert a.shape == (2, 10, 30) and torch.equal(a[:, :6], b[:, :6])
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "blocks.1.attn.q_proj" in names and len(names) == 13
    assert SequenceCrossEntropy()(a, x).dim() == 0
    with pytest.raises(ValueError, match="multiple of heads"):
        TransformerConfig(vocab=5, width=10, heads=4).validate()
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 11, dtype=torch.long))


# ------------------------------------------------------------------------- the reproduction
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("qt")
    out, cwd = root / "out", root / "cwd"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)  # nothing may be written outside out_dir
        result = experiments.run("quantise-transformer", out, quick=True)
    return result, out, cwd


def test_quick_run_writes_its_report_and_figures(quick):
    result, out, cwd = quick
    assert not any(cwd.iterdir())
    for name in ("result.json", "report.md", "runs.json"):
        assert (out / name).is_file()
    assert len(result.figures) == 3
    for rel in result.figures:
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["method"]: r for r in result.tables["perplexity"]}
    assert list(rows) == method_names(Config.quick())
    assert rows["float32"]["paper_OPT-125M"] == 27.65
    runs = json.loads((out / "runs.json").read_text())
    first = runs["seeds"]["0"]["rows"]
    assert first["OBS 50%"]["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert len(first["GPTQ-4"]["layer_relative_errors"]) == 12  # 2 blocks × 6 projections


def test_quick_run_reproduces_the_robust_part_of_the_ordering(quick):
    result = quick[0]
    rows = {r["method"]: r["perplexity"] for r in result.tables["perplexity"]}
    # a trained model: clearly better than uniform guessing over the vocabulary
    assert rows["float32"] < 0.5 * VOCAB_SIZE
    # compression costs perplexity; 3 bits cost more than 4; GPTQ beats RTN at 3 bits
    for name, ppl in rows.items():
        if name != "float32":
            assert ppl >= rows["float32"] * 0.999, name
    assert rows["GPTQ-3"] < rows["RTN-3"]
    assert rows["RTN-4"] < rows["RTN-3"]
    assert result.claim("GPTQ-3 below RTN-3 (1 seed)").held
    assert any(c.name.startswith("the paper's ordering") for c in result.claims)


def test_config_validation():
    with pytest.raises(ValueError, match="bits"):
        apply_overrides(Config.quick(), {"bits": (9,)})
    with pytest.raises(ValueError, match="width"):
        apply_overrides(Config.quick(), {"width": 30, "heads": 4})
    assert experiments.make_config("quantise-transformer", True, ["hf=true"]).hf
