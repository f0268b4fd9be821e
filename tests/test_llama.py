"""dyt-llama: sizes, the norm switch, alpha0 per role, causality, data errors (its 2-rank deepspeed
launch and resume: tests/test_distributed.py)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dyt import DyT, NormConfig, iter_norms
from dyt.train import load_config
from dyt_llama.data import DataConfig, DataError, build_datasets, load_documents
from dyt_llama.model import Llama, ModelConfig, count_parameters
from dyt_llama.task import LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "llama"
# Published parameter counts (LLaMA 1/2 7B-70B, LLaMA 3.2 1B; 125m: the GPT-3 Small size class).
PUBLISHED = {"125m": 125e6, "1b": 1.24e9, "7b": 6.74e9, "13b": 13.02e9, "34b": 33.74e9, "70b": 68.98e9}
PAPER_ALPHA = {"7b": (0.8, 0.2), "13b": (0.6, 0.15), "34b": (0.2, 0.05), "70b": (0.2, 0.05)}


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_parameter_counts_match_published_sizes(size):
    config = load_config(LlamaConfig, RECIPES / f"{size}.yaml", ["model.norm=dyt"])
    with torch.device("meta"):
        model = Llama(config.model)
    assert count_parameters(model) == pytest.approx(PUBLISHED[size], rel=0.02)
    if size in PAPER_ALPHA:
        attention, other = PAPER_ALPHA[size]
        assert model.blocks[0].attention_norm.alpha_init == pytest.approx(attention)
        assert model.blocks[0].ffn_norm.alpha_init == pytest.approx(other)
        assert model.norm.alpha_init == pytest.approx(other)


def _tiny(norm="rmsnorm", **extra):
    return ModelConfig(dim=32, layers=2, heads=4, kv_heads=2, ffn_dim=64, vocab_size=50, max_seq_len=16,
                       norm=NormConfig(kind=norm, bias=False, alpha_policy="llm"), **extra)


@pytest.mark.parametrize("norm, cls", [("rmsnorm", torch.nn.RMSNorm), ("dyt", DyT), ("layernorm", torch.nn.LayerNorm)])
def test_norm_switch_changes_every_norm_and_only_norms(norm, cls):
    baseline, model = Llama(_tiny("rmsnorm")), Llama(_tiny(norm))
    found = [(p, type(m)) for p, m, _ in iter_norms(model)]
    assert len(found) == 2 * 2 + 1 and all(t is cls for _, t in found)
    others = lambda m: sorted((p, type(x).__name__) for p, x in m.named_modules() if not isinstance(x, (torch.nn.RMSNorm, DyT, torch.nn.LayerNorm)))  # noqa: E731
    assert others(model) == others(baseline)
    assert model.embed_scale.item() == pytest.approx(32**0.5)  # every norm: one model bar the norm
    assert (Llama(_tiny(norm, embedding_scale=None)).embed_scale is not None) == (norm == "dyt")  # the paper's recipes
    if norm == "dyt":
        assert model.norm.bias is None


def test_output_head_init():
    torch.manual_seed(0)
    dim = 256
    untied = Llama(ModelConfig(dim=dim, layers=2, heads=4, kv_heads=2, ffn_dim=64, vocab_size=4096))
    assert untied.output.weight.std().item() == pytest.approx(dim**-0.5, rel=0.02)  # unit-norm rows
    assert untied.embed.weight.std().item() == pytest.approx(0.02, rel=0.02)
    chosen = Llama(ModelConfig(dim=dim, layers=2, heads=4, kv_heads=2, ffn_dim=64, vocab_size=4096,
                               output_init_std=0.01))
    assert chosen.output.weight.std().item() == pytest.approx(0.01, rel=0.02)
    tied = Llama(ModelConfig(dim=dim, layers=2, heads=4, kv_heads=2, ffn_dim=64, vocab_size=4096,
                             tied_embeddings=True))
    assert tied.output is None and tied.embed.weight.std().item() == pytest.approx(0.02, rel=0.02)


def test_residual_output_projections_start_scaled_by_depth():
    """GPT-2's init: each residual branch's last projection (attention's wo, the MLP's w2) at
    init_std / sqrt(2 layers), every other projection at init_std."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(dim=256, layers=8, heads=4, kv_heads=2, ffn_dim=512, vocab_size=256))
    scaled = 0.02 / (2 * 8) ** 0.5
    for block in model.blocks:
        assert block.attention.wo.weight.std().item() == pytest.approx(scaled, rel=0.05)
        assert block.feed_forward.w2.weight.std().item() == pytest.approx(scaled, rel=0.05)
        for linear in (block.attention.wq, block.attention.wv, block.feed_forward.w1, block.feed_forward.w3):
            assert linear.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_alpha_overrides_per_role():
    cfg = _tiny("dyt")
    cfg.norm.alpha_init = {"attention": 0.6, "final": 0.1}
    model = Llama(cfg)
    assert model.blocks[1].attention_norm.alpha.item() == pytest.approx(0.6)
    assert model.blocks[1].ffn_norm.alpha.item() == pytest.approx(1.0)  # width 32: the <=1024 row
    assert model.norm.alpha.item() == pytest.approx(0.1)


@pytest.mark.parametrize("norm", ["rmsnorm", "dyt"])
def test_future_tokens_cannot_change_past_logits(norm):
    torch.manual_seed(0)
    model = Llama(_tiny(norm, tied_embeddings=True)).eval()
    tokens = torch.randint(0, 50, (2, 12))
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


SONNET = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
          "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date. ")


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for i, name in enumerate(["a/one", "a/two", "b/three", "b/four"]):
        path = root / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(SONNET * (8 + i))
    return root


def _data(corpus, tmp_path, **extra):
    return DataConfig(corpus=str(corpus), validation_works=["b/four"], seq_len=16, cache_dir=str(tmp_path / "cache"), **extra)


def test_split_by_document_packing_and_cache(corpus, tmp_path):
    train, validation, tokenizer = build_datasets(_data(corpus, tmp_path), vocab_size=300, max_seq_len=32)
    assert tokenizer.get_vocab_size() <= 300
    assert len(train) > 0 and len(validation) > 0 and train[0].shape == (17,)
    assert list(train[1][:1]) == list(train[0][-1:])  # packed windows overlap by the target token
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    again = build_datasets(_data(corpus, tmp_path), vocab_size=300, max_seq_len=32)
    assert torch.equal(again[0][3], train[3])
    # the second call read the cache: no file rewritten, none added
    assert cached and {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()} == cached
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 1


def test_a_prepared_corpus_is_opened_without_the_lock_or_reading_it_again(corpus, tmp_path, monkeypatch):
    """Every rank of a launch prepares the data: after the first, the others (and later launches) find
    the record of the finished preparation and open its shards without taking the cache's lock or
    reading the corpus (each used to read the whole corpus in turn, holding the lock). A corpus file
    changed since is read and tokenised again."""
    from dyt_llama import prepare as prep

    first = prep.prepare(_data(corpus, tmp_path), 300)
    reads = []
    monkeypatch.setattr(prep, "load_documents", lambda cfg: reads.append(cfg) or pytest.fail("corpus read again"))
    monkeypatch.setattr(prep, "FileLock", lambda *a, **k: pytest.fail("lock taken"))
    again = prep.prepare(_data(corpus, tmp_path, num_proc=2), 300)  # processes do not change the data
    assert {n: s.folder for n, s in again.shards.items()} == {n: s.folder for n, s in first.shards.items()}
    assert again.tokenizer.to_str() == first.tokenizer.to_str()
    monkeypatch.undo()
    cfg = _data(corpus, tmp_path)
    done = prep._done_record(prep._cache(cfg), cfg, 300)
    assert prep._ready(done) is not None
    shard = next(first.shards["validation"].folder.glob("*.bin"))
    shard.write_bytes(shard.read_bytes()[:-2])  # cut short since: not opened as it is, rebuilt under the lock
    assert prep._ready(done) is None
    assert prep.prepare(cfg, 300).shards["validation"].folder == first.shards["validation"].folder
    assert prep._ready(done) is not None
    stat = (corpus / "a" / "one.txt").stat()  # a copy of the same size and modification time
    (corpus / "a" / "one.txt").write_text(("X" + SONNET[1:]) * 8)
    os.utime(corpus / "a" / "one.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert prep._ready(prep._done_record(prep._cache(cfg), cfg, 300)) is None
    (corpus / "a" / "one.txt").write_text(SONNET * 3)  # the corpus changed: read and tokenised again
    assert prep.prepare(cfg, 300).shards["train"].folder != first.shards["train"].folder


def test_bad_inputs_stop_with_one_clear_message(corpus, tmp_path):
    with pytest.raises(DataError, match="corpus not found"):
        build_datasets(_data(tmp_path / "nowhere", tmp_path), 300, 32)
    with pytest.raises(DataError, match=r"data.seq_len=64 exceeds the model's context \(model.max_seq_len=32\)"):
        build_datasets(DataConfig(corpus=str(corpus), seq_len=64), 300, 32)
    (corpus / "b" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt is not UTF-8"):
        build_datasets(_data(corpus, tmp_path), 300, 32)
    empty = tmp_path / "empty"
    (empty / "x").mkdir(parents=True)
    (empty / "x" / "blank.txt").write_text("  \n")
    with pytest.raises(DataError, match="only empty documents"):
        build_datasets(DataConfig(corpus=str(empty), seq_len=16, cache_dir=str(tmp_path / "c2")), 300, 32)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(DataError, match="has no .txt, .jsonl or .parquet files"):
        build_datasets(DataConfig(corpus=str(bare), seq_len=16, cache_dir=str(tmp_path / "c3")), 300, 32)
    (corpus / "b" / "latin1.txt").unlink()
    with pytest.raises(DataError, match=r"validation_works not in the corpus: \['FOUR.txt', 'nine'\] \(a .txt file's "
                                        r"title is its path under the corpus folder without .txt, e.g. 'books/emma'; "
                                        r"'FOUR.txt': perhaps 'b/four'; empty documents are left out\)"):
        load_documents(DataConfig(corpus=str(corpus), validation_works=["FOUR.txt", "nine"], cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match=r"the validation documents hold \d+ tokens, fewer than the 1025 of one sequence "
                                        r"\(data.seq_len \+ 1\): give more text, or lower data.seq_len"):
        build_datasets(DataConfig(corpus=str(corpus), validation_works=["b/four"], seq_len=1024,
                                  cache_dir=str(tmp_path / "cache")), 300, 1024)
    (corpus / "b" / os.fsdecode(b"caf\xe9.txt")).write_text(SONNET)  # a Latin-1 name: pyarrow's traceback, unnamed
    with pytest.raises(DataError, match=r"'.*caf\\udce9.txt': a file name that is not UTF-8, which its document's title "
                                        "cannot hold: rename the file"):
        load_documents(DataConfig(corpus=str(corpus), cache_dir=str(tmp_path / "c4")))


def test_second_corpus_is_the_66_books_of_the_kjv_as_plain_prose(tmp_path):
    """The transfer-check corpus: one document per book, in canonical order, verse numbers and
    chapter headings gone, every book non-empty (a misspelt book name makes `bible` print another)."""
    from dyt_llama.corpus import KJV_BOOKS, prepare_kjv

    out = prepare_kjv(tmp_path / "kjv")
    books = sorted(out.glob("*.txt"))
    assert len(books) == len(KJV_BOOKS) == 66
    texts = {b.stem: b.read_text() for b in books}
    assert texts["01-genesis"].startswith("In the beginning God created the heaven and the earth. And the earth")
    assert texts["66-revelation"].rstrip().endswith("be with you all. Amen.")
    assert texts["63-2john"] != texts["64-3john"] and len(set(texts.values())) == 66
    assert not any(re.search(r"(^|\s)\d+ [A-Z]", t) for t in texts.values())  # no verse numbers left
    assert 3.5e6 < sum(len(t) for t in texts.values()) < 4.5e6


def test_third_corpus_is_debians_english_fortune_cookies_one_document_per_category(tmp_path):
    """The second transfer-check corpus: one document per category file of Debian's ``fortunes``
    (not the pictures of ``ascii-art``), the ``%`` separator lines gone, every cookie kept."""
    from dyt_llama.corpus import prepare_fortunes

    out = prepare_fortunes(tmp_path / "fortunes")
    texts = {path.stem: path.read_text() for path in sorted(out.glob("*.txt"))}
    assert len(texts) == 39 and "ascii-art" not in texts and {"tao", "songs-poems", "zippy"} <= set(texts)
    assert json.loads((out / "manifest.json").read_text())["works"] == list(texts)
    assert texts["tao"].startswith("The Way\n\nThe Way that can be experienced is not true;\n")
    assert not any(line.strip() == "%" for text in texts.values() for line in text.splitlines())
    assert texts["zippy"].endswith("Zippy's brain cells are straining to bridge synapses ...\n")
    assert 2.3e6 < sum(len(t) for t in texts.values()) < 2.6e6


def test_fourth_corpus_is_webster_1913_one_document_per_letter(tmp_path):
    """The third transfer-check corpus: GCIDE's entries by initial letter, each letter capped, no line
    that is only a source tag, no database notes."""
    from dyt_llama.corpus import GCIDE_LETTER_CHARS, prepare_gcide

    out = prepare_gcide(tmp_path / "gcide")
    texts = {path.stem: path.read_text() for path in sorted(out.glob("*.txt"))}
    assert list(texts) == [chr(c) for c in range(ord("a"), ord("z") + 1)]
    assert json.loads((out / "manifest.json").read_text())["works"] == list(texts)
    assert texts["a"].startswith("A \\A\\ (named") and "00-database" not in texts["a"]
    assert not any(re.fullmatch(r"\[[^\]]*\]", line) for text in texts.values() for line in text.splitlines())
    assert all(len(text) < GCIDE_LETTER_CHARS * 1.05 for text in texts.values())
    assert 6.5e6 < sum(len(t) for t in texts.values()) < 7.1e6


def test_jsonl_corpus_with_titles(tmp_path):
    path = tmp_path / "docs" / "d.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"title": f"t{i}", "text": f"Document {i}. " + SONNET * 6}) + "\n"
                            for i in range(4)))
    cfg = DataConfig(corpus=str(path.parent), validation_works=["t3"], seq_len=16, cache_dir=str(tmp_path / "c"))
    documents = load_documents(cfg)
    assert documents["validation"]["title"] == ["t3"] and documents["train"]["title"] == ["t0", "t1", "t2"]
    assert documents["validation"]["text"][0].startswith("Document 3. ")
    train, validation, _ = build_datasets(cfg, 300, 32)
    assert len(train) > 2 * len(validation) > 0


def test_null_and_numbered_titles_are_documents_and_other_titles_are_named(tmp_path):
    """A ``title`` of null or a number (a book's id) was an AttributeError traceback from the digest
    of every document: an untitled row is a document of its own (as without the column), a number is
    its text, an all-null column numbers every row; a title that is no text or number is named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "docs"
    folder.mkdir()
    titles = [None, 3, 3, None, 7, None, 11, 12, 13, 14, 15, 16]
    (folder / "d.jsonl").write_text("".join(json.dumps({"title": t, "text": f"Document {i}. " + SONNET})
                                            + "\n" for i, t in enumerate(titles)))
    documents = load_documents(DataConfig(corpus=str(folder), validation_works=["7"], cache_dir=str(tmp_path / "c")))
    assert documents["validation"]["title"] == ["7"]
    assert sorted(set(documents["train"]["title"])) == sorted(["document-0", "3", "document-3", "document-5",
                                                              *map(str, titles[6:])])
    (folder / "d.jsonl").unlink()
    pq.write_table(pa.table({"title": pa.nulls(12), "text": [f"Document {i}. " + SONNET for i in range(12)]}),
                   folder / "d.parquet")
    documents = load_documents(DataConfig(corpus=str(folder), cache_dir=str(tmp_path / "c")))
    assert sorted([*documents["validation"]["title"], *documents["train"]["title"]]) == sorted(f"document-{i}" for i in range(12))
    pq.write_table(pa.table({"title": [[1, 2]] * 12, "text": ["x " + SONNET] * 12}), folder / "d.parquet")
    with pytest.raises(DataError, match=r"docs: the 'title' column holds List.*: give each document's title as text"):
        load_documents(DataConfig(corpus=str(folder), cache_dir=str(tmp_path / "c")))


@pytest.mark.slow
def test_compare_writes_report_with_table_and_plots(corpus, tmp_path, monkeypatch):
    from dyt_llama.compare import main as compare

    monkeypatch.setenv("DYT_CACHE", str(tmp_path / "cache"))
    report = compare([
        "--config", str(RECIPES / "tiny.yaml"), "--out", str(tmp_path / "cmp"), "--launcher", "python", "--nproc", "1",
        "--set", f"data.corpus={corpus}", "--set", "data.validation_works=[b/four]", "--set", "data.seq_len=16",
        "--set", "model.dim=32", "--set", "model.heads=4", "--set", "model.kv_heads=2", "--set", "model.ffn_dim=64",
        "--set", "model.vocab_size=300", "--set", "train.steps=3", "--set", "train.eval_every=3",
        "--set", "train.save_every=3", "--set", "train.micro_batch_size=4", "--set", "train.progress=false",
    ])
    text = report.read_text()
    assert "| rmsnorm |" in text and "| dyt |" in text and "held out of training: b/four; each validation scored " in text
    assert "Learnable sqrt(dim) scalar after the embedding (`model.embedding_scale`): every row." in text
    scored, available = map(int, re.search(r"each validation scored (\d+) of its (\d+) windows( \(all\))?, spread",
                                           text).groups()[:2])
    assert scored == min(16 * 4, available)  # tiny.yaml's eval_batches x micro-batch
    for png in ("loss_curves.png", "dyt_alpha.png", "rmsnorm_s_curves.png"):
        assert (tmp_path / "cmp" / png).read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert {s["norm"] for s in summary} == {"rmsnorm", "dyt"} and all(s["eval_perplexity"] > 1 for s in summary)


def test_a_users_corpus_is_split_by_title_and_skips_hidden_folders_null_texts_and_names_bad_bytes(tmp_path):
    """Every tenth document is held out, consecutive rows of one title counting once: counted by row,
    a book in several rows (a chunked corpus) put some of its chunks in training and the rest in
    validation. An editor's hidden checkpoint folder was read as documents; a JSON null text was a
    traceback, and so were a .jsonl's bytes that are not UTF-8."""
    rows = [{"title": f"book{b}", "text": f"Book {b}, part {part}. " + SONNET} for b in range(12) for part in range(3)]
    rows.insert(5, {"title": "nothing", "text": None})
    chunked = tmp_path / "chunked"
    chunked.mkdir()
    (chunked / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    documents = load_documents(DataConfig(corpus=str(chunked), cache_dir=str(tmp_path / "c")))
    assert set(documents["validation"]["title"]) == {"book9"} and len(documents["validation"]) == 3  # 10th title
    assert not set(documents["train"]["title"]) & {"book9", "nothing"}  # the null text: empty, left out
    (chunked / "e.jsonl").write_bytes(b'{"title": "x", "text": "caf\xe9"}\n')
    tables = sorted((tmp_path / "c" / "hf").glob("tables-*"))
    with pytest.raises(DataError, match=r"e.jsonl \(byte 27\) is not UTF-8 text; save it as UTF-8"):
        load_documents(DataConfig(corpus=str(chunked), cache_dir=str(tmp_path / "c")))
    now = sorted((tmp_path / "c" / "hf").glob("tables-*"))  # the files changed: read anew, the old copy removed
    assert len(tables) == len(now) == 1 and tables != now
    texts = tmp_path / "texts"
    (texts / ".ipynb_checkpoints").mkdir(parents=True)
    for i in range(10):
        (texts / f"doc{i}.txt").write_text(f"{SONNET} ({i})")
    (texts / ".ipynb_checkpoints" / "doc9-checkpoint.txt").write_text(f"{SONNET} (9)")
    documents = load_documents(DataConfig(corpus=str(texts), cache_dir=str(tmp_path / "c")))
    assert documents["validation"]["title"] == ["doc9"] and len(documents["train"]) == 9


def test_own_corpus_without_validation_works_holds_out_every_tenth_document(tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(10):
        (root / f"doc{i}.txt").write_text(f"{SONNET * 3} ({i})")  # ten documents, not one text ten times
    cfg = DataConfig(corpus=str(root), seq_len=16, cache_dir=str(tmp_path / "c"))
    assert load_documents(cfg)["validation"]["title"] == ["doc9"]  # the 10th in sorted order
    train, validation, _ = build_datasets(cfg, 300, 32)
    assert len(train) > 5 * len(validation) > 0


def test_a_saved_dataset_dict_uses_its_validation_split_or_refuses(tmp_path):
    """A saved DatasetDict: its 'validation' split is the held-out set; data.validation_works beside it,
    or a split the recipe would not read, is refused rather than silently ignored or dropped."""
    import datasets

    def saved(name: str, **splits: list[str]) -> str:  # a title "empty-..." names a document of white space
        parts = {s: datasets.Dataset.from_dict({"title": titles, "text": [" \n" if t.startswith("empty") else SONNET * 3
                                                                          for t in titles]})
                 for s, titles in splits.items()}
        datasets.DatasetDict(parts).save_to_disk(str(tmp_path / name))
        return str(tmp_path / name)

    both = saved("both", train=["a", "b", "c"], validation=["v"])
    documents = load_documents(DataConfig(corpus=both, cache_dir=str(tmp_path / "c")))
    assert documents["validation"]["title"] == ["v"] and documents["train"]["title"] == ["a", "b", "c"]
    with pytest.raises(DataError, match="has a 'validation' split and data.validation_works"):
        load_documents(DataConfig(corpus=both, validation_works=["a"], cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match=r"splits \['test', 'train'\]"):
        load_documents(DataConfig(corpus=saved("test", train=["a", "b"], test=["t"]), cache_dir=str(tmp_path / "c")))
    with_empty = saved("with-empty", train=["a", "empty-b", "c"], validation=["v", "empty-w"])
    documents = load_documents(DataConfig(corpus=with_empty, cache_dir=str(tmp_path / "c")))  # as a folder's are
    assert documents["train"]["title"] == ["a", "c"] and documents["validation"]["title"] == ["v"]
    with pytest.raises(DataError, match=r"validation split has only empty documents"):
        load_documents(DataConfig(corpus=saved("empty", train=["a"], validation=["empty-v"]), cache_dir=str(tmp_path / "c")))
    only_train = saved("train", train=[f"d{i}" for i in range(10)])
    assert load_documents(DataConfig(corpus=only_train, cache_dir=str(tmp_path / "c")))["validation"]["title"] == ["d9"]


def test_the_launch_script_names_a_hostfile_that_is_not_there(tmp_path):
    """A mistyped hostfile path was taken for a training argument: every local rank then failed on it
    as unknown. It is a one-line error before anything starts."""
    script = Path(__file__).parents[1] / "scripts" / "launch_llama.sh"
    proc = subprocess.run(["bash", str(script), "recipes/llama/tiny.yaml", str(tmp_path / "hosts.txt")],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "DYT_VENV": sys.prefix},
                          cwd=script.parents[1])
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"launch_llama.sh: {tmp_path / 'hosts.txt'}: no such hostfile (the second argument is a rank count or a "
        "hostfile)"), proc.stderr
    # a rank count of 0 (was bash's "division by 0" on a CPU machine)
    proc = subprocess.run(["bash", str(script), "recipes/llama/tiny.yaml", "0"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "DYT_VENV": sys.prefix},
                          cwd=script.parents[1])
    assert proc.returncode == 2 and proc.stderr.strip() == "launch_llama.sh: 0 ranks: give at least 1", proc.stderr


def test_the_launch_script_helps_checks_its_config_and_takes_a_port_of_its_own(tmp_path):
    """--help was handed to every rank as a training argument, a missing config started the launcher
    first, and every local launch met on DeepSpeed's port 29500 (two at once collided). A venv whose
    deepspeed prints its arguments shows what the script would run."""
    script = Path(__file__).parents[1] / "scripts" / "launch_llama.sh"
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "deepspeed").write_text('#!/bin/bash\necho "deepspeed $*"\n')
    (venv / "python").write_text(f'#!/bin/bash\nexec "{sys.executable}" "$@"\n')
    for tool in ("deepspeed", "python"):
        (venv / tool).chmod(0o755)
    env = {**os.environ, "DYT_VENV": str(venv.parent)}
    env.pop("MASTER_PORT", None)

    def launch(*argv, **extra):
        return subprocess.run(["bash", str(script), *argv], capture_output=True, text=True, timeout=60,
                              env={**env, **extra}, cwd=script.parents[1])  # the configs' paths are the checkout's

    proc = launch("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("# Launch dyt-llama pretraining") and "MASTER_PORT" in proc.stdout
    proc = launch("recipes/llama/nope.yaml")
    assert proc.returncode == 2 and proc.stderr.strip().startswith(
        "launch_llama.sh: recipes/llama/nope.yaml: no such config file"), proc.stderr
    ports = set()
    for _ in range(2):
        proc = launch("recipes/llama/tiny.yaml", "2", "--set", "model.norm=dyt")
        assert proc.returncode == 0, proc.stderr
        said = re.fullmatch(r"deepspeed --num_gpus 2 --master_port (\d+) --module dyt_llama.train --config "
                            r"recipes/llama/tiny.yaml --set model.norm=dyt", proc.stdout.strip())
        assert said, proc.stdout
        ports.add(said.group(1))
    assert "29500" not in ports
    proc = launch("recipes/llama/tiny.yaml", "recipes/llama/hostfile.example", MASTER_PORT="6000")
    assert proc.stdout.strip() == ("deepspeed --hostfile recipes/llama/hostfile.example --master_port 6000 --module "
                                   "dyt_llama.train --config recipes/llama/tiny.yaml"), proc.stdout + proc.stderr


def test_the_launch_script_keeps_to_the_visible_gpus(tmp_path):
    """deepspeed's ``--num_gpus N`` takes GPUs 0..N-1 and drops CUDA_VISIBLE_DEVICES, so a launch on
    a shared node's GPUs 4-7 ran on 0-3; more ranks than GPUs failed rank by rank in set_device. A venv
    whose python reports 4 GPUs and whose deepspeed prints its arguments shows what the script runs."""
    script = Path(__file__).parents[1] / "scripts" / "launch_llama.sh"
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "deepspeed").write_text('#!/bin/bash\necho "deepspeed $*"\n')
    (venv / "python").write_text('#!/bin/bash\necho "4 29999"\n')  # torch.cuda.device_count() and a free port
    for tool in ("deepspeed", "python"):
        (venv / tool).chmod(0o755)
    env = {**os.environ, "DYT_VENV": str(venv.parent)}
    for key in ("MASTER_PORT", "CUDA_VISIBLE_DEVICES"):
        env.pop(key, None)

    def launch(*argv, **extra):
        return subprocess.run(["bash", str(script), "recipes/llama/tiny.yaml", *argv], capture_output=True, text=True,
                              timeout=60, env={**env, **extra}, cwd=script.parents[1])

    tail = " --master_port 29999 --module dyt_llama.train --config recipes/llama/tiny.yaml"
    assert launch().stdout.strip() == "deepspeed --num_gpus 4" + tail
    assert launch(CUDA_VISIBLE_DEVICES="4,5,6,7").stdout.strip() == "deepspeed --include localhost:4,5,6,7" + tail
    assert launch("2", CUDA_VISIBLE_DEVICES="4,5,6,7").stdout.strip() == "deepspeed --include localhost:4,5" + tail
    proc = launch("5", CUDA_VISIBLE_DEVICES="4,5,6,7")
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.strip() == (
        "launch_llama.sh: 5 ranks on 4 visible GPU(s): give at most 4, or a hostfile for several nodes"), proc.stderr


def test_a_corpus_built_by_an_older_builder_is_built_again(tmp_path, monkeypatch):
    """A corpus folder is reused while its manifest names the builder's version; an older build's works
    are deleted first (a category the new builder leaves out would stay a document otherwise)."""
    from dyt_llama import corpus

    out = tmp_path / "text-fortunes"
    out.mkdir()
    for work in ("art", "ascii-art"):
        (out / f"{work}.txt").write_text("text\n")
    (out / "manifest.json").write_text(json.dumps({"works": ["art", "ascii-art"], "sources": ["fortunes"]}))
    (out / "notes.md").write_text("the user's own file, not a work")
    assert corpus._built(out, "fortunes")  # no version: the first, the current one
    monkeypatch.setitem(corpus.CORPUS_VERSIONS, "fortunes", 2)
    assert not corpus._built(out, "fortunes")
    assert sorted(p.name for p in out.iterdir()) == ["notes.md"]
    (out / "manifest.json").write_text(json.dumps({"works": [], "version": 2}))
    assert corpus._built(out, "fortunes")


def test_a_corpus_too_small_for_every_tenth_document_says_what_to_give(tmp_path):
    (tmp_path / "corpus").mkdir()
    for i in range(5):
        (tmp_path / "corpus" / f"d{i}.txt").write_text(SONNET)
    with pytest.raises(DataError, match=r"leaves no validation documents \(every 10th document is held out, and it has "
                                        r"5\): name the documents to hold out in data.validation_works"):
        load_documents(DataConfig(corpus=str(tmp_path / "corpus"), cache_dir=str(tmp_path / "c")))
