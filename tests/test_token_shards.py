"""LLaMA token data on disk (dyt_llama.prepare, dyt_data.shards): the windows training reads from
the memory map are the rows the in-memory packing gave, for any number of tokenising processes and
shard sizes; the dtype and index; a write killed mid-way resumes without rewriting finished shards
and ends identical to an uninterrupted write; ranks read disjoint windows, and only theirs; held-out
documents never reach the training shards."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil

import numpy as np
import pytest
import torch

from dyt.train import DistInfo, TrainConfig
from dyt.train.trainer import DataPosition, ResumableBatches
from dyt_data import shards as shard_module
from dyt_data.shards import TokenShards, plan_by_size, token_dtype, write_shards
from dyt_llama import prepare as prepare_module
from dyt_llama.data import EOS, DataConfig, DataError, build_datasets, load_documents

WORDS = ("shall compare thee summer day thou art more lovely temperate rough winds shake darling buds may "
         "lease hath short date sometime too hot eye heaven shines often gold complexion dimmed").split()


def _write_corpus(root, count=12, seed=0):
    """``count`` documents of different lengths, each opening with a marker of its own."""
    rng = random.Random(seed)
    for i in range(count):
        path = root / f"{'ab'[i % 2]}" / f"doc{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 400)))
        path.write_text(f"Opening of document {i:02d}. {body}\n")
    return root


def _config(tmp_path, corpus, **extra) -> DataConfig:
    return DataConfig(corpus=str(corpus), validation_works=["b/doc03", "a/doc08"], seq_len=16,
                      cache_dir=str(tmp_path / "cache"), **extra)


def _old_packed_rows(docs, tokenizer, seq_len):
    """The rows of the in-memory packing this replaced: the whole split encoded at once, each
    document followed by <eos>, cut into rows of seq_len + 1 every seq_len tokens."""
    stream = []
    for encoding in tokenizer.encode_batch(list(docs["text"])):
        stream += encoding.ids + [tokenizer.token_to_id(EOS)]
    return [stream[i : i + seq_len + 1] for i in range(0, len(stream) - seq_len, seq_len)]


@pytest.mark.parametrize("num_proc,shard_chars", [(1, 10**9), (1, 700), (2, 4000)],
                         ids=["one-shard", "many-shards", "two-processes"])
def test_windows_from_the_memory_map_are_the_packed_rows(tmp_path, num_proc, shard_chars):
    corpus = _write_corpus(tmp_path / "corpus")
    cfg = _config(tmp_path, corpus, num_proc=num_proc, shard_chars=shard_chars)
    train, validation, tokenizer = build_datasets(cfg, vocab_size=300, max_seq_len=32)
    docs = load_documents(cfg)
    for rows, split in ((train, "train"), (validation, "validation")):
        expected = _old_packed_rows(docs[split], tokenizer, cfg.seq_len)
        assert [rows[i].tolist() for i in range(len(rows))] == expected
        assert rows[0].dtype == torch.int64
    index = train.shards.index
    assert (len(index["shards"]) > 1) == (shard_chars < 10**9)
    assert index["dtype"] == "uint16" and train.shards.dtype == np.uint16
    assert index["meta"]["vocab_size"] == tokenizer.get_vocab_size()
    assert index["documents"] == len(docs["train"]) and index["tokens"] == len(train.shards)
    # document boundaries: each document's tokens end with <eos> at the recorded end
    lengths = [len(e.ids) + 1 for e in tokenizer.encode_batch(list(docs["train"]["text"]))]
    assert train.shards.document_ends().tolist() == np.cumsum(lengths).tolist()
    # kept beside the shards, not in the index every rank and worker loads (its size: one line per shard)
    assert all(set(shard) == {"file", "tokens", "sha256", "documents", "ends_file"} for shard in index["shards"])
    for shard in index["shards"]:
        data = np.fromfile(train.shards.folder / shard["file"], dtype=np.uint16)
        assert len(data) == shard["tokens"] and data[-1] == tokenizer.token_to_id(EOS)


def test_a_vocabulary_over_65536_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {EOS: 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "big.json"))
    corpus = tmp_path / "corpus"
    for i in range(4):
        (corpus / f"d{i}.txt").parent.mkdir(parents=True, exist_ok=True)
        (corpus / f"d{i}.txt").write_text(" ".join(f"w{(i * 7919 + k * 104729) % 70_000}" for k in range(100)))
    cfg = DataConfig(corpus=str(corpus), validation_works=["d3"], tokenizer_file=str(tmp_path / "big.json"),
                     seq_len=16, cache_dir=str(tmp_path / "cache"))
    train, _, _ = build_datasets(cfg, vocab_size=70_002, max_seq_len=32)
    assert train.shards.index["dtype"] == "uint32"
    stream = train.shards.read(0, len(train.shards))
    assert stream.max() > 65_535  # ids above uint16 survive the round trip
    assert stream[:100].tolist() == [vocab[f"w{(k * 104729) % 70_000}"] for k in range(100)]
    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32


def test_a_tokenizer_with_its_own_end_of_text_token(tmp_path):
    """LLaMA's tokenizers end a document with </s> (1 and 2) or <|end_of_text|> (3), not the recipe's
    <eos>: data.eos_token names it, and a tokenizer without the named token is refused, naming the key."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(50)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "llama.json"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"d{i}.txt").write_text(" ".join(f"w{(i + k) % 50}" for k in range(40)))
    cfg = DataConfig(corpus=str(corpus), validation_works=["d3"], tokenizer_file=str(tmp_path / "llama.json"),
                     seq_len=16, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"has no '<eos>' token \(data.eos_token"):
        build_datasets(cfg, vocab_size=53, max_seq_len=32)
    train, _, _ = build_datasets(dataclasses.replace(cfg, eos_token="</s>"), vocab_size=53, max_seq_len=32)
    stream = train.shards.read(0, len(train.shards)).tolist()
    assert [stream[end - 1] for end in train.shards.document_ends().tolist()] == [2, 2, 2]
    assert stream.count(2) == 3 and train.shards.index["meta"]["eos"] == 2


class _Killed(Exception):
    pass


def _fake_shard(first, end, path):
    """A deterministic shard: document d has d % 5 + 1 tokens, each d."""
    counts = [d % 5 + 1 for d in range(first, end)]
    np.concatenate([np.full(c, d, np.uint16) for d, c in zip(range(first, end), counts)]).tofile(path)
    return counts


def _counting(calls):
    def write(first, end, path):
        calls.append(first)
        return _fake_shard(first, end, path)
    return write


def test_a_killed_write_resumes_keeps_finished_shards_and_matches_an_uninterrupted_one(tmp_path):
    plan = plan_by_size([3] * 40, 30)  # 4 shards of 10 documents
    assert plan == [[0, 10], [10, 20], [20, 30], [30, 40]]
    whole = write_shards(tmp_path / "whole", plan, _fake_shard, np.uint16, {"k": 1})

    calls = []

    def dies_in_shard_2(first, end, path):
        calls.append(first)
        if first == 20:
            path.write_bytes(b"\x01\x00" * 3)  # a partial shard, as a kill leaves it
            raise _Killed
        return _fake_shard(first, end, path)

    folder = tmp_path / "killed"
    with pytest.raises(_Killed):
        write_shards(folder, plan, dies_in_shard_2, np.uint16, {"k": 1})
    partial, = folder.glob("shard-00002.bin.*.tmp")
    assert not (folder / "index.json").exists()
    partial.rename(folder / "shard-00002.bin.another-host.1.tmp")  # as a killed process on another node leaves it
    (folder / "shard-00002.bin.another-host.1.tmp.tokens.part00000").write_bytes(b"\x01\x00")  # its tokeniser's parts
    (folder / "shard-00002.ends.npy.another-host.1.tmp").write_bytes(b"")
    kept = {n: (folder / f"shard-0000{n}.bin").stat() for n in (0, 1)}

    calls.clear()
    resumed = write_shards(folder, plan, _counting(calls), np.uint16, {"k": 1})
    assert calls == [20, 30]  # the finished shards were verified and kept
    for n, stat in kept.items():
        now = (folder / f"shard-0000{n}.bin").stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert not list(folder.glob("*.tmp*"))
    assert resumed == whole
    for n in range(4):
        name = f"shard-0000{n}.bin"
        assert (folder / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert TokenShards(folder).read(0, whole["tokens"]).tolist() == TokenShards(tmp_path / "whole").read(0, whole["tokens"]).tolist()

    # a finished shard whose bytes no longer match its checksum is written again
    (folder / "index.json").unlink()
    data = bytearray((folder / "shard-00001.bin").read_bytes())
    data[0] ^= 0xFF
    (folder / "shard-00001.bin").write_bytes(bytes(data))
    calls.clear()
    write_shards(folder, plan, _counting(calls), np.uint16, {"k": 1})
    assert calls == [10]
    assert (folder / "shard-00001.bin").read_bytes() == (tmp_path / "whole" / "shard-00001.bin").read_bytes()

    # a complete stream whose shard was since cut short, or zeroed in place, is not reused as it is:
    # the damaged shard is found (size and time, then sha256) and written again; an untouched one is reused
    calls.clear()
    write_shards(folder, plan, _counting(calls), np.uint16, {"k": 1})
    assert calls == []
    for damage in (lambda b: b[: len(b) // 2], lambda b: bytes(len(b))):
        shard = folder / "shard-00002.bin"
        stamp = shard.stat().st_mtime_ns
        shard.write_bytes(damage(shard.read_bytes()))
        os.utime(shard, ns=(stamp + 10**9, stamp + 10**9))  # later, as damage comes (coarse clocks may not tick here)
        calls.clear()
        assert write_shards(folder, plan, _counting(calls), np.uint16, {"k": 1}) == whole
        assert calls == [20]
        assert shard.read_bytes() == (tmp_path / "whole" / "shard-00002.bin").read_bytes()

    # another plan or meta (another tokenizer, other documents) starts over
    calls.clear()
    write_shards(folder, plan, _counting(calls), np.uint16, {"k": 2})
    assert calls == [0, 10, 20, 30]


def test_prepare_killed_after_two_shards_resumes_to_the_same_token_data(tmp_path, monkeypatch):
    corpus = _write_corpus(tmp_path / "corpus")
    whole, _, _ = build_datasets(_config(tmp_path / "whole", corpus, shard_chars=700), 300, 32)

    real = shard_module.write_shards
    written = []

    def dying_writer(folder, plan, write_shard, *args, **kwargs):
        def shard(first, end, path):
            if len(written) == 2:  # the training split comes first: killed in its third shard
                raise _Killed
            written.append(first)
            return write_shard(first, end, path)
        return real(folder, plan, shard, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "write_shards", dying_writer)
    cfg = _config(tmp_path, corpus, shard_chars=700)
    with pytest.raises(_Killed):
        build_datasets(cfg, 300, 32)
    folder = next((tmp_path / "cache" / "tokens").iterdir())
    first_two = {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("shard-*.bin"))}
    assert len(first_two) == 2

    monkeypatch.setattr(prepare_module, "write_shards", real)
    prepare_module.main(["--set", f"data.corpus={corpus}", "--set", "data.validation_works=[b/doc03,a/doc08]",
                         "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.shard_chars=700",
                         "--set", "model.vocab_size=300"])
    for name, mtime in first_two.items():
        assert (folder / name).stat().st_mtime_ns == mtime, f"{name} was written again"
    train, _, _ = build_datasets(cfg, 300, 32)
    assert train.shards.folder == folder
    assert train.shards.read(0, len(train.shards)).tolist() == whole.shards.read(0, len(whole.shards)).tolist()


def test_another_shard_size_gets_its_own_folder_and_leaves_the_old_shards_readable(tmp_path):
    """data.shard_chars may change between a run and its resume, or between two jobs on one cache:
    the other plan's shards go to a folder of their own, so shards a job has open keep their tokens."""
    corpus = _write_corpus(tmp_path / "corpus")
    first, _, _ = build_datasets(_config(tmp_path, corpus, shard_chars=700), 300, 32)
    tokens = first.shards.read(0, len(first.shards)).tolist()
    second, _, _ = build_datasets(_config(tmp_path, corpus, shard_chars=4000), 300, 32)
    assert second.shards.folder != first.shards.folder
    assert len(second.shards.index["shards"]) < len(first.shards.index["shards"])
    assert second.shards.read(0, len(second.shards)).tolist() == tokens  # the same tokens, cut elsewhere
    reopened = type(first.shards)(first.shards.folder)
    assert reopened.index == first.shards.index and reopened.read(0, len(reopened)).tolist() == tokens


def test_ranks_read_disjoint_windows_and_only_their_own(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus", count=30)
    train, _, _ = build_datasets(_config(tmp_path, corpus, shard_chars=1500), 300, 32)
    assert len(train) >= 32
    cfg = TrainConfig(micro_batch_size=4, seed=5)
    starts, rows = {}, {}
    for rank in range(2):
        reads = []
        real_read = train.shards.read
        train.shards.read = lambda start, length, real_read=real_read, reads=reads: (reads.append(start), real_read(start, length))[1]
        batches = ResumableBatches(train, type("Collate", (), {"collate": staticmethod(torch.stack)})(), cfg,
                                   DistInfo(rank, 2, rank, torch.device("cpu")))
        stream = batches.iterate(DataPosition())
        per_epoch = len(train) // 2 // cfg.micro_batch_size
        rows[rank] = torch.cat([next(stream) for _ in range(per_epoch)])
        del train.shards.read
        starts[rank] = reads
    assert not set(starts[0]) & set(starts[1])  # no window read by both ranks
    assert all(s % train.seq_len == 0 for s in starts[0] + starts[1])
    assert len(starts[0]) == len(starts[1]) == len(rows[0])  # each rank read exactly the windows it trained on
    for rank in range(2):
        assert [r.tolist() for r in rows[rank]] == [train[s // train.seq_len].tolist() for s in starts[rank]]
    usable = (len(train) // (2 * cfg.micro_batch_size)) * 2 * cfg.micro_batch_size
    assert len(set(starts[0]) | set(starts[1])) == usable  # one epoch covers each usable window once


def test_held_out_documents_are_never_in_the_training_shards(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus", count=20)
    cfg = _config(tmp_path, corpus, shard_chars=900)
    train, validation, tokenizer = build_datasets(cfg, 300, 32)
    docs = load_documents(cfg)
    held_texts = set(docs["validation"]["text"])
    assert {t.split(".")[0] for t in held_texts} == {"Opening of document 03", "Opening of document 08"}

    def documents(shards):
        stream, start, out = shards.read(0, len(shards)).tolist(), 0, []
        for end in shards.document_ends().tolist():
            out.append(tokenizer.decode(stream[start : end - 1]))  # without its <eos>
            start = end
        return out

    train_docs = documents(train.shards)
    assert train_docs == list(docs["train"]["text"])  # the training shards hold the training documents, in order
    assert not held_texts & set(train_docs)
    assert not any("document 03" in d or "document 08" in d for d in train_docs)
    assert set(documents(validation.shards)) == held_texts


@pytest.mark.parametrize("args,names", [
    (["--set", "data.corpus={tmp}/nowhere"], ["corpus not found", "nowhere"]),
    (["--num-proc", "0"], ["--num-proc", "0 is out of range: it must be at least 1"]),  # the option typed
], ids=["corpus-missing", "no-processes"])
def test_prepare_command_reports_bad_input_in_one_line(tmp_path, args, names):
    import subprocess
    import sys
    from pathlib import Path

    command = [str(Path(sys.executable).parent / "dyt-llama-prepare"),
               *[a.replace("{tmp}", str(tmp_path)) for a in args], "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dyt-llama-prepare: ") and "Traceback" not in proc.stderr
    assert all(name in last for name in names), last


def test_the_corpus_readers_cached_results_follow_their_version(monkeypatch):
    """datasets keys a module function's cached map or filter by its name, not its code: the
    readers' results follow DOCUMENTS_VERSION only if every reader is given it."""
    import datasets

    from dyt_llama import data as data_module

    table = datasets.Dataset.from_dict({"text": ["one", "two"]})
    before = data_module._document_table(table, "corpus")
    monkeypatch.setattr(data_module, "DOCUMENTS_VERSION", data_module.DOCUMENTS_VERSION + 1)
    after = data_module._document_table(table, "corpus")
    assert list(after["title"]) == list(before["title"]) == ["document-0", "document-1"]
    assert after._fingerprint != before._fingerprint


def test_parquet_corpus_without_titles_holds_out_every_tenth_document(tmp_path):
    import datasets

    rng = random.Random(1)
    texts = [f"Row {i}. " + " ".join(rng.choice(WORDS) for _ in range(60)) for i in range(20)]
    (tmp_path / "corpus").mkdir()
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "corpus" / "part.parquet"))
    cfg = DataConfig(corpus=str(tmp_path / "corpus"), seq_len=16, cache_dir=str(tmp_path / "cache"), shard_chars=900)
    train, validation, tokenizer = build_datasets(cfg, 300, 32)
    docs = load_documents(cfg)
    assert list(docs["validation"]["title"]) == ["document-9", "document-19"]
    assert list(docs["validation"]["text"]) == [texts[9], texts[19]]
    for rows, split in ((train, "train"), (validation, "validation")):
        assert [rows[i].tolist() for i in range(len(rows))] == _old_packed_rows(docs[split], tokenizer, cfg.seq_len)


def test_later_ranks_read_the_survey_instead_of_passing_over_every_document(tmp_path, monkeypatch):
    """Every rank prepares its data under one lock, one after another: the first records the
    documents' content key, shard plan and duplicate check, and the others (and later launches) read
    them. A corpus file changed since is surveyed again."""
    corpus = _write_corpus(tmp_path / "corpus")
    cfg = _config(tmp_path, corpus, shard_chars=700)
    first, _, _ = build_datasets(cfg, 300, 32)

    def passed_over(*args):
        raise AssertionError("surveyed again")

    monkeypatch.setattr(prepare_module, "_content_and_plan", passed_over)
    monkeypatch.setattr(prepare_module, "check_validation_unseen", passed_over)
    again, _, _ = build_datasets(cfg, 300, 32)
    assert again.shards.folder == first.shards.folder
    (corpus / "a" / "doc00.txt").write_text("Opening of document 00. rewritten since\n")
    with pytest.raises(AssertionError, match="surveyed again"):
        build_datasets(cfg, 300, 32)


def test_the_copy_check_holds_64_bits_a_validation_document_and_confirms_by_the_whole_digest():
    """The validation digests were held as Python strings with their titles (~400 bytes a document:
    40 GB for a billion-document corpus's tenth); now their first 64 bits. Two digests alike in those
    bits and no more are not a copy; real copies are counted, the first named."""
    import datasets

    def split(titles, digests):
        return datasets.Dataset.from_dict({"title": titles}), datasets.Dataset.from_dict({"text_digest": digests})

    same_head = "0123456789abcdef"
    train_docs, train_stats = split(["t0", "t1", "t2"], [same_head + "1" * 48, "a" * 64, "b" * 64])
    validation_docs, validation_stats = split(["v0", "v1", "v2"], [same_head + "2" * 48, "c" * 64, "d" * 64])
    docs = {"train": train_docs, "validation": validation_docs}
    prepare_module.check_validation_unseen(docs, {"train": train_stats, "validation": validation_stats})  # 64 bits alike
    validation_docs, validation_stats = split(["v0", "v1", "v2", "v3"],
                                              [same_head + "2" * 48, "b" * 64, "c" * 64, "a" * 64])
    with pytest.raises(DataError, match=r"^2 validation document\(s\) have the text of a training document; first: "
                                        r"validation 'v1' = training 't2'"):
        prepare_module.check_validation_unseen({"train": train_docs, "validation": validation_docs},
                                               {"train": train_stats, "validation": validation_stats})
    keys = prepare_module._digest_keys(validation_stats.with_format("arrow")["text_digest"])
    assert keys.dtype == np.uint64 and int(keys[0]) == 0x0123456789ABCDEF and int(keys[1]) == 0xBBBBBBBBBBBBBBBB
    import pyarrow as pa

    large = pa.chunked_array([pa.array([], pa.large_string()), pa.array(["b" * 64, "c" * 64], pa.large_string())[1:]])
    assert prepare_module._digest_keys(large).tolist() == [0xCCCCCCCCCCCCCCCC]  # 64-bit offsets, a sliced chunk


def test_a_full_disk_while_preparing_is_one_line_and_a_rerun_finishes_the_same_shards(tmp_path, monkeypatch):
    """A full disk (or quota) while the token shards were written was a traceback, and under
    ``datasets.map`` workers one whose cause came back as text; numpy's ``tofile`` even reported it as
    a short write without an errno. It is one data error naming the cache and its free space, and a
    rerun with room finishes shards equal to an undisturbed preparation's."""
    import errno

    from dyt_data import disk_full

    corpus = _write_corpus(tmp_path / "corpus")
    reference, _, _ = build_datasets(_config(tmp_path / "reference", corpus), 300, 32)
    cfg = _config(tmp_path, corpus)
    writes = []

    class FullDisk:
        """The part file as a full disk leaves it: the second write fails."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            writes.append(len(data))
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.handle.write(data)

    real_open = open
    monkeypatch.setattr(prepare_module, "open", lambda path, mode="r", *args: (
        FullDisk if mode == "ab" else lambda handle: handle)(real_open(path, mode, *args)), raising=False)  # part files
    with pytest.raises(DataError, match=rf"^the disk is full, or the quota spent \(No space left on device, writing in "
                                        rf"{tmp_path / 'cache'}, \d+ MiB free there\): free space, or point the cache"):
        build_datasets(cfg, 300, 32)
    monkeypatch.undo()
    again, _, _ = build_datasets(cfg, 300, 32)
    assert [again[i].tolist() for i in range(len(again))] == [reference[i].tolist() for i in range(len(reference))]
    text = RuntimeError("a worker failed")  # a datasets.map worker's error: its cause is its traceback's text
    text.__cause__ = Exception("Traceback ...\nOSError: [Errno 122] Disk quota exceeded\n")
    assert disk_full(text) == (text.__cause__, errno.EDQUOT) and disk_full(ValueError("no")) is None
    quoted = DataError("corpus x: its json files do not read as one table (OSError: No space left on device)")
    quoted.__context__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/cache/hf/part.arrow")
    assert disk_full(quoted) == (quoted.__context__, errno.ENOSPC)  # the errno's, which names the file, first


def test_worker_processes_are_at_most_the_cpus_this_process_may_use(monkeypatch, capsys, tmp_path):
    """``--num-proc 64`` on a 2-CPU share of a node started 64 workers, each with its own tokenizer:
    memory and switching for shards that are the same for any count."""
    import dyt_data.processes as processes
    from dyt_data import worker_processes

    quota = tmp_path / "cpu.max"  # cgroup v2
    for written, cpus in (("max 100000\n", None), ("150000 100000\n", 1.5), ("", None)):
        quota.write_text(written)
        assert processes._cgroup_quota(tmp_path) == cpus
    quota.unlink()
    assert processes._cgroup_quota(tmp_path) is None
    for folder in ("cpu", "cpu,cpuacct"):  # cgroup v1, which docker on such a host sets too
        v1 = tmp_path / "v1" / folder
        v1.mkdir(parents=True)
        (v1 / "cpu.cfs_period_us").write_text("100000\n")
        for written, cpus in (("-1\n", None), ("250000\n", 2.5), ("", None)):
            (v1 / "cpu.cfs_quota_us").write_text(written)
            assert processes._cgroup_quota(tmp_path / "v1") == cpus, (folder, written)
        shutil.rmtree(tmp_path / "v1")
    monkeypatch.setattr(processes, "_cgroup_quota", lambda: 0.5)  # docker --cpus 0.5
    assert processes.usable_cpus() == 1
    monkeypatch.setattr(processes, "usable_cpus", lambda: 2)
    assert worker_processes(2, "data.num_proc") == 2 and capsys.readouterr().out == ""
    assert worker_processes(64, "data.num_proc") == 2
    assert capsys.readouterr().out == "data.num_proc 64 is more than the 2 CPU(s) this process may use: 2 worker processes\n"
    from dyt_llama import prepare as prep
    from dyt_llama.data import DataConfig

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):  # every 10th is held out
        (corpus / f"d{i:02d}.txt").write_text(f"document {i} " * 50)
    asked = []
    monkeypatch.setattr(prep, "worker_processes", lambda n, setting: asked.append((n, setting)) or 1)
    monkeypatch.setattr(prep, "_survey", lambda docs, num_proc, *a: asked.append(num_proc) or pytest.fail("stop here"))
    with pytest.raises(pytest.fail.Exception, match="stop here"):
        prep.prepare(DataConfig(corpus=str(corpus), cache_dir=str(tmp_path / "cache"), num_proc=64), 300)
    assert asked == [(64, "data.num_proc"), 1]  # the preparation works with the capped count


def test_a_long_document_is_encoded_in_pieces_to_the_tokens_of_the_whole(tmp_path, monkeypatch):
    """A 15 MB single-document corpus (nanoGPT's input.txt) took ~3.8 GB to tokenise (about 200 bytes a
    character in the tokenizer's encodings): a document longer than ENCODE_CHARS is now cut between
    two words, where the trained byte-level BPE gives the tokens of the whole; a tokenizer for which a
    cut would change them (a template adding <s>) still encodes it whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rng = random.Random(0)
    words = ["Shall", "I", "compare", "thee", "to", "a", "summer's", "day?", "Thou", "art", "more", "lovely",
             "42", "1599", "--", "\u00e9t\u00e9", "na\u00efve", "(May)", "x" * 40, "  ", "\t", "don't", "CAPS!"]
    text = "".join(rng.choice(words) + rng.choice([" ", " ", " ", "\n", "\n\n", ", ", " \n", "  "]) for _ in range(6000))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS],
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert prepare_module.cuts_exactly(tokenizer)
    eos = tokenizer.token_to_id(EOS)
    short = "A short one.\n"
    whole = tokenizer.encode(text).ids + [eos] + tokenizer.encode(short).ids + [eos]
    monkeypatch.setattr(prepare_module, "ENCODE_CHARS", 500)
    pieces = list(prepare_module._pieces(text, 500))
    assert "".join(pieces) == text and len(pieces) > len(text) // 500 and max(map(len, pieces)) <= 500
    encoded = []

    class Watched:  # the tokenizer, telling how many characters each call hands it
        def encode_batch_fast(self, texts):
            encoded.append(sum(map(len, texts)))
            return tokenizer.encode_batch_fast(texts)

    counts = prepare_module._tokenise({"text": [text, short]}, 0, Watched(), eos, "uint16", str(tmp_path / "a"), cut=True)
    assert max(encoded) <= 500 and sum(encoded) == len(text) + len(short)
    written = np.fromfile(tmp_path / "a.part0000", dtype=np.uint16).tolist()
    assert written == whole and counts == {"tokens": [len(whole) - len(tokenizer.encode(short).ids) - 1,
                                                      len(tokenizer.encode(short).ids) + 1]}
    from tokenizers import AddedToken

    for change in (lambda t: setattr(t, "post_processor", processors.TemplateProcessing(single=f"{EOS} $A",
                                                                                     special_tokens=[(EOS, eos)])),
                   lambda t: t.add_tokens(["New York"]), lambda t: t.add_tokens([AddedToken("abc", rstrip=True)]),
                   lambda t: t.add_tokens([AddedToken("def", lstrip=True)]),
                   lambda t: t.add_tokens([AddedToken("ghi", single_word=True)]), lambda t: t.enable_truncation(8),
                   lambda t: t.enable_padding()):
        changed = Tokenizer.from_str(tokenizer.to_str())
        change(changed)
        assert not prepare_module.cuts_exactly(changed)
    tokenizer.add_tokens(["<code>"])  # an added token with no whitespace, taking none: matched alike
    assert prepare_module.cuts_exactly(tokenizer)
    coded = text.replace("thee ", "<code> thee <code>")
    (tmp_path / "b.part0000").unlink(missing_ok=True)
    prepare_module._tokenise({"text": [coded]}, 0, tokenizer, eos, "uint16", str(tmp_path / "b"), cut=True)
    assert np.fromfile(tmp_path / "b.part0000", dtype=np.uint16).tolist() == tokenizer.encode(coded).ids + [eos]
    assert list(prepare_module._pieces("x" * 2000, 500)) == ["x" * 2000]  # no gap: whole


def test_the_bpe_trains_on_a_long_run_without_whitespace_in_pieces_and_on_other_text_as_it_is(tmp_path, monkeypatch):
    """The BPE trainer's time grows with the square of a word's length (a 200k-character run took
    40 s to prepare, a 5 MB base64 blob hours): such a run is trained on in pieces; ordinary text, and
    the tokenizer trained on it, are unchanged, and every run is still encoded whole."""
    import datasets

    from dyt_llama import data as data_module

    texts = ["Shall I compare thee to a summer's day?\n" * 50, "a blob: " + "QUJD" * 600 + " ends." + " " * 2500 + "!"]
    trained = list(data_module._bpe_training_texts(datasets.Dataset.from_dict({"text": texts})))
    assert trained[0] == texts[0] and "".join(trained[1:]) == texts[1]  # nothing added
    assert trained[1:] == ["a blob: " + "QUJD" * 250, "QUJD" * 250, "QUJD" * 100 + " ends." + " " * 1000,
                           " " * 1000, " " * 500 + "!"]
    assert data_module._has_long_runs(datasets.Dataset.from_dict({"text": texts}))
    assert not data_module._has_long_runs(datasets.Dataset.from_dict({"text": texts[:1]}))
    cfg = DataConfig(cache_dir=str(tmp_path / "c"))
    ordinary = datasets.Dataset.from_dict({"text": [texts[0]]})
    tokenizer = data_module.load_tokenizer(cfg, ordinary, 300, content_key="ordinary")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    plain = Tokenizer(models.BPE())  # trained on the text as it is, as before
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.decoder = decoders.ByteLevel()
    plain.train_from_iterator([texts[0]], trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], show_progress=False,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tokenizer.to_str() == plain.to_str()
    blob = datasets.Dataset.from_dict({"text": texts})  # trained on in pieces: a key of its own, not the whole-run one's
    data_module.load_tokenizer(cfg, blob, 300, content_key="blob")
    monkeypatch.setattr(data_module, "_has_long_runs", lambda docs: False)
    data_module.load_tokenizer(cfg, blob, 300, content_key="blob")
    assert len(list((tmp_path / "c" / "tokenizers").glob("*.json"))) == 3
