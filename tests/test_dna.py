"""dyt-dna: tokenizer and FASTA, the pure scan, RC equivariance, causality, norm coverage, data
formats and errors, a 2-rank run, fine-tuning. Real DNA: the genomes shipped in pyrodigal's tests."""

import dataclasses
import gzip
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from dyt import DyT, NormConfig, iter_norms
from dyt.train import read_metrics
from dyt.train.distributed import free_port
from dyt.train.finetune import Standardize
from dyt_dna import data as dna_data
from dyt_dna.caduceus import RCPS, BiMamba, RCPSEmbedding, RCPSLMHead, rc_hidden
from dyt_dna.config import CaduceusOptions, DnaModelConfig
from dyt_dna.data import (
    DnaDataConfig,
    DnaDataError,
    _coding_windows,
    _gene_spans,
    _genes,
    _start_windows,
    csv_task,
    genomic_benchmarks,
    mask_for_mlm,
    pretraining_datasets,
    tokens,
)
from dyt_dna.fasta import FastaError, read_fasta
from dyt_dna.genomes import Genome
from dyt_dna.hyena import fft_long_conv
from dyt_dna.scan import selective_scan, selective_scan_reference
from dyt_dna.task import build_model
from dyt_dna.tokenizer import COMPLEMENT, MASK, PAD, AlphabetError, decode, encode, reverse_complement

ROOT = Path(__file__).resolve().parents[1]
PYRODIGAL_DATA = Path(__import__("pyrodigal").__file__).parent / "tests" / "data"
GENOME_A = PYRODIGAL_DATA / "KK037166.fna.gz"
GENOME_B = PYRODIGAL_DATA / "GCF_001457455.1_NCTC11397_genomic_100kb.fna.gz"


def _genome(path=GENOME_B) -> str:
    return read_fasta(path)[0].sequence


def _model(arch, norm="layernorm", rcps=True, dim=16, layers=2, tied=True):
    cfg = DnaModelConfig(arch=arch, dim=dim, layers=layers, max_len=128, norm=NormConfig(kind=norm),
                         caduceus=CaduceusOptions(state=4, rcps=rcps), tied_embeddings=tied)
    return build_model(cfg).double()


# ---------------------------------------------------------------- tokenizer and FASTA

@pytest.mark.parametrize("arch", ["hyena", "caduceus"])
@pytest.mark.parametrize("norm", ["layernorm", "dyt"])
def test_weight_decay_skips_what_the_published_models_do_not_decay(arch, norm):
    """Mamba's A_log and D and HyenaDNA's implicit filter are not decayed (mamba_ssm's and HyenaDNA's
    ``_no_weight_decay`` / filter ``weight_decay: 0``), for both norms alike; the other matrices are."""
    from dyt.train.trainer import weight_decay_groups

    model = _model(arch, norm)
    decayed, kept = (group["params"] for group in weight_decay_groups(model, 0.1))
    names = {id(p): name for name, p in model.named_parameters()}
    decayed_names, kept_names = {names[id(p)] for p in decayed}, {names[id(p)] for p in kept}
    assert not any(name.endswith(("A_log", ".D", ".freq")) or ".filter." in name for name in decayed_names)
    special = [n for n in kept_names if n.endswith("A_log") or (".filter.mlp." in n and n.endswith("weight"))]
    assert special, sorted(kept_names)
    assert any(name.endswith("in_proj.weight") for name in decayed_names)
    assert not any("norm" in name for name in decayed_names)


def test_rc_augment_draws_its_flips_in_the_ranks_process_in_training_only():
    """The flip is drawn in ``loss`` from the RNG a checkpoint saves (collate runs in DataLoader workers
    when train.num_workers > 0, whose RNG restarts on --resume); validation batches are not flipped."""
    from dyt_dna.task import DnaConfig, DnaPretrainTask

    task = DnaPretrainTask.__new__(DnaPretrainTask)
    task.config = DnaConfig(model=DnaModelConfig(arch="hyena", dim=16, layers=1, max_len=64),
                            data=DnaDataConfig(window=30, rc_augment=True))
    torch.manual_seed(0)
    batch = task.collate([{"sequence": "ACGTTGCAAC" * 3}] * 16)
    assert torch.equal(batch, tokens(["ACGTTGCAAC" * 3] * 16))  # collate draws nothing

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, inputs):
            seen.append(inputs.clone())
            return torch.zeros(*inputs.shape, 8)

    model = Recorder()
    task.loss(model.train(), batch)
    flipped = (seen[-1] != batch[:, :-1]).any(dim=1)
    assert 0 < flipped.sum() < 16
    assert torch.equal(seen[-1][flipped], reverse_complement(batch[flipped])[:, :-1])
    task.loss(model.eval(), batch)
    assert torch.equal(seen[-1], batch[:, :-1])


def test_tokenizer_round_trip_reverse_complement_and_ambiguity_codes():
    seq = _genome()[:500]
    assert decode(encode(seq)) == seq
    assert decode(encode(seq.lower())) == seq
    assert decode(reverse_complement(encode("AACGTN"))) == "NACGTT"
    assert torch.equal(reverse_complement(reverse_complement(encode(seq))), encode(seq))
    assert torch.equal(COMPLEMENT[COMPLEMENT], torch.arange(len(COMPLEMENT)))
    assert decode(encode("ACRYG")) == "ACNNG"
    with pytest.raises(AlphabetError, match=r"'X' at base 4 \(counting from 1\)"):
        encode("ACGXT")


def test_fasta_gzip_multi_record_lower_case_and_n_runs(tmp_path):
    path = tmp_path / "two.fa.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(">one first record\nacgtNNNN\nACGT\n>two\nTTTT\n")
    records = read_fasta(path)
    assert [(r.name, r.sequence) for r in records] == [("one", "ACGTNNNNACGT"), ("two", "TTTT")]
    (tmp_path / "empty.fa").write_text(">a\nACGT\n>b\n>c\nAC\n")
    with pytest.raises(FastaError, match="record 'b' is empty"):
        read_fasta(tmp_path / "empty.fa")
    (tmp_path / "bad.fa").write_text(">a\nACGT\nAC1T\n")
    with pytest.raises(AlphabetError, match=r"bad.fa record 'a'.*'1' at base 7 \(counting from 1\)"):
        read_fasta(tmp_path / "bad.fa")
    (tmp_path / "none.fa").write_text("ACGT\n")
    with pytest.raises(FastaError, match="before the first '>'"):
        read_fasta(tmp_path / "none.fa")
    with pytest.raises(FastaError, match="no such FASTA file"):
        read_fasta(tmp_path / "missing.fa")
    damaged = bytearray(gzip.compress((">a\n" + "ACGTTGCA" * 4000 + "\n").encode()))
    damaged[20:24] = b"\xff\x00\xff\x00"  # flipped bytes in the deflate stream: zlib's "invalid bit length repeat"
    (tmp_path / "damaged.fa.gz").write_bytes(bytes(damaged))
    with pytest.raises(FastaError, match=r"damaged.fa.gz: not a readable gzipped FASTA file"):
        read_fasta(tmp_path / "damaged.fa.gz")


def test_fasta_headers_are_text_of_any_script_and_gzip_is_known_by_its_bytes(tmp_path):
    """A header with non-ASCII text (an en dash, a micro sign) or a byte-order mark was refused as 'not
    a readable text FASTA file' ('ascii' codec), though a header never reaches the model; gzip was
    known by a '.gz' name only, and other compressions got the same codec message."""
    import bz2

    text = "\ufeff>chr1 Escherichia coli \u2013 5 \u00b5m plasmid\nACGT\nacgn\n"
    (tmp_path / "utf8.fa").write_text(text, encoding="utf-8")
    assert [(r.name, r.sequence) for r in read_fasta(tmp_path / "utf8.fa")] == [("chr1", "ACGTACGN")]
    (tmp_path / "GENOME.FA.GZIP").write_bytes(gzip.compress(text.encode()))
    assert [r.sequence for r in read_fasta(tmp_path / "GENOME.FA.GZIP")] == ["ACGTACGN"]
    (tmp_path / "genome.fa.bz2").write_bytes(bz2.compress(text.encode()))
    with pytest.raises(FastaError, match=r"genome.fa.bz2: compressed as bzip2 \(bunzip2 it\): give it plain or gzipped"):
        read_fasta(tmp_path / "genome.fa.bz2")
    (tmp_path / "mac.fa").write_bytes(b">a x\rACGT\rAC\r  >b\rTT\r")  # old Mac line ends, an indented header
    assert [(r.name, r.sequence) for r in read_fasta(tmp_path / "mac.fa")] == [("a", "ACGTAC"), ("b", "TT")]
    (tmp_path / "odd.fa").write_bytes(b">a\nACGT\nAC\xc3\x9fT\n")
    with pytest.raises(FastaError, match=r"odd.fa:3: byte 0xc3 at column 3 of a sequence line is not ASCII"):
        read_fasta(tmp_path / "odd.fa")


def test_fasta_records_come_one_at_a_time():
    """A genome is read record by record (a human one held whole took ~6 GB): the first record is
    handed over before a later bad one is read, and an empty file still says it has no records."""
    import tempfile

    from dyt_dna.fasta import iter_fasta

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "chromosomes.fa"
        path.write_text(">chr1\nACGTN\n>chr2\nAC1T\n")
        records = iter_fasta(path)
        assert next(records).sequence == "ACGTN"
        with pytest.raises(AlphabetError, match="record 'chr2'"):
            next(records)
        (Path(folder) / "empty.fa").write_text("; a comment, no record\n")
        with pytest.raises(FastaError, match="no FASTA records"):
            list(iter_fasta(Path(folder) / "empty.fa"))


# ---------------------------------------------------------------- the scan

@pytest.mark.parametrize("length", [1, 7, 37, 100])
def test_parallel_scan_equals_step_by_step_reference(length):
    torch.manual_seed(length)
    b, d, n = 2, 6, 4
    x = torch.randn(b, d, length, dtype=torch.float64, requires_grad=True)
    dt = torch.nn.functional.softplus(torch.randn(b, d, length, dtype=torch.float64) - 2).requires_grad_()
    A = -torch.arange(1, n + 1, dtype=torch.float64).repeat(d, 1)
    B, C = (torch.randn(b, n, length, dtype=torch.float64, requires_grad=True) for _ in range(2))
    D = torch.randn(d, dtype=torch.float64)
    inputs = (x, dt, B, C)
    fast = selective_scan(x, dt, A, B, C, D)
    slow = selective_scan_reference(x, dt, A, B, C, D)
    torch.testing.assert_close(fast.double(), slow, rtol=1e-5, atol=1e-5)
    grads_fast = torch.autograd.grad(fast.sum(), inputs)
    grads_slow = torch.autograd.grad(slow.sum(), inputs)
    for g_fast, g_slow in zip(grads_fast, grads_slow):
        torch.testing.assert_close(g_fast.double(), g_slow, rtol=1e-4, atol=1e-4)


def _very_fast_decay():
    """exp(-S) inside a chunk would overflow in float32 here: (x, dt, A, B, C, D)."""
    x, B, C = torch.ones(1, 2, 40), torch.ones(1, 1, 40), torch.ones(1, 1, 40)
    return x, torch.full((1, 2, 40), 8.0), torch.tensor([[-16.0], [-1.0]]), B, C, torch.zeros(2)


@pytest.mark.parametrize("use_kernel", [False, True])
def test_bf16_scan_takes_its_time_step_in_float32(use_kernel):
    """dt = softplus(dt_raw + dt_bias) in float32, as mamba_ssm's kernel: in bf16 a bias near -6.9
    (Mamba's init for dt ~ 1e-3) is off by up to 0.03, and the state's input with it (the scan's output
    was 4x further from float64 on the same bf16 values)."""
    from dyt_dna.scan import scan

    torch.manual_seed(0)
    b, d, n, length = 2, 16, 8, 64
    dt = torch.exp(torch.empty(d).uniform_(math.log(1e-3), math.log(0.1)))
    dt_bias = (dt + torch.log(-torch.expm1(-dt))).bfloat16()  # softplus^-1, as Mamba initialises it
    x, dt_raw = torch.randn(b, d, length).bfloat16(), (torch.randn(b, d, length) * 0.1).bfloat16()
    B, C = torch.randn(b, n, length).bfloat16(), torch.randn(b, n, length).bfloat16()
    A, D = -torch.arange(1, n + 1).float().repeat(d, 1), torch.zeros(d)  # no skip term: the scan alone
    y = scan(x, dt_raw, dt_bias, A, B, C, D, use_kernel=use_kernel).float()
    reference = scan(*(t.double() for t in (x, dt_raw, dt_bias, A, B, C, D)), use_kernel=False)
    assert ((y - reference).norm() / reference.norm()).item() < 3e-3  # bf16's rounding of y; 6.7e-3 before


def test_scan_survives_very_fast_decay():
    """The result must stay finite and right."""
    inputs = _very_fast_decay()
    fast = selective_scan(*inputs)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, selective_scan_reference(*inputs), rtol=1e-4, atol=1e-4)


def _scan_inputs(b, d, n, length, dtype, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(b, d, length, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, d, length, dtype=dtype) - 2)
    A = -torch.arange(1, n + 1, dtype=dtype).repeat(d, 1) * torch.rand(d, 1, dtype=dtype)
    B, C = torch.randn(b, n, length, dtype=dtype), torch.randn(b, n, length, dtype=dtype)
    D = torch.randn(d, dtype=dtype)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D)]


@pytest.fixture(scope="module")
def scan_cpu():
    """Skipped only where there is no C++ compiler: with one, a failed build fails these tests with
    the compiler's reason (a broken kernel must not turn into skips)."""
    from dyt.backends import _have_cpp_compiler
    from dyt_dna import scan_cpu

    if not _have_cpp_compiler():
        pytest.skip("the C++ selective scan needs a C++ compiler (g++ or clang++)")
    scan_cpu.EXTENSION.load()
    return scan_cpu


# state sizes below, at and above a vector's width (8 floats on AVX2, 16 on AVX-512), length 1 included
@pytest.mark.parametrize("shape", [(2, 6, 4, 37), (1, 3, 17, 5), (2, 5, 8, 1), (3, 4, 16, 100), (1, 2, 33, 64)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cpp_scan_equals_step_by_step_reference_with_every_gradient(scan_cpu, shape, dtype):
    inputs = _scan_inputs(*shape, dtype)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    reference = selective_scan_reference(*ref_inputs)
    out = scan_cpu.selective_scan_cpu(*inputs)
    assert out.dtype == dtype
    tolerance = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 5e-2}[dtype]
    scale = reference.abs().max().item()
    torch.testing.assert_close(out.double(), reference.detach(), rtol=0, atol=tolerance * max(scale, 1.0))
    gy = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, gy.to(dtype))
    expected = torch.autograd.grad(reference, ref_inputs, gy)
    for name, got, want in zip("x dt A B C D".split(), grads, expected):
        assert got.dtype == dtype and got.shape == want.shape, name
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tolerance * max(scale, 1.0), msg=name)


def test_cpp_scan_refuses_double_backward(scan_cpu):
    """Its gradients carry no history, so a second backward must raise, not silently drop the scan."""
    inputs = _scan_inputs(1, 2, 4, 5, torch.float64)
    out = scan_cpu.selective_scan_cpu(*inputs)
    with pytest.raises(RuntimeError, match="no double backward.*use_kernel=False"):
        torch.autograd.grad(out.sum(), inputs[0], create_graph=True)
    (gx,) = torch.autograd.grad(out.sum(), inputs[0])  # a plain backward is unaffected
    assert gx.shape == inputs[0].shape


def test_cpp_scan_survives_very_fast_decay_and_propagates_nan(scan_cpu):
    x, dt, A, B, C, D = _very_fast_decay()
    out = scan_cpu.selective_scan_cpu(x, dt, A, B, C, D)
    torch.testing.assert_close(out, selective_scan_reference(x, dt, A, B, C, D), rtol=1e-5, atol=1e-5)
    x[0, 1, 5] = float("nan")
    out = scan_cpu.selective_scan_cpu(x, dt, A, B, C, D)
    assert out[0, 1, 5:].isnan().all() and not out[0, 1, :5].isnan().any() and not out[0, 0].isnan().any()


def test_scan_runs_the_cpp_kernel_on_cpu_and_the_chunked_scan_where_it_cannot_build(scan_cpu, monkeypatch):
    from dyt.kernels.cpp_build import CpuKernelBuildError
    from dyt_dna.scan import scan

    x, dt, A, B, C, D = (t.detach() for t in _scan_inputs(2, 4, 8, 20, torch.float32))
    bias = torch.zeros(4)
    with_kernel = scan(x, dt, bias, A, B, C, D)
    x.requires_grad_()  # which implementation ran shows in the autograd node
    assert type(scan(x, dt, bias, A, B, C, D).grad_fn).__name__ == "SelectiveScanCpuBackward"
    chunked = scan(x, dt, bias, A, B, C, D, use_kernel=False)
    assert "SelectiveScanCpu" not in type(chunked.grad_fn).__name__
    torch.testing.assert_close(with_kernel, chunked.detach(), rtol=1e-5, atol=1e-5)

    def no_compiler(level):
        raise CpuKernelBuildError("building its C++ selective scan failed (g++: not found)")

    monkeypatch.setattr(scan_cpu.EXTENSION, "build", no_compiler)
    monkeypatch.setattr(scan_cpu.EXTENSION, "built", {})
    with pytest.warns(RuntimeWarning, match="selective scan is unavailable.*g\\+\\+: not found.*chunked PyTorch scan"):
        fallback = scan(x, dt, bias, A, B, C, D)
    assert "SelectiveScanCpu" not in type(fallback.grad_fn).__name__
    torch.testing.assert_close(fallback.detach(), with_kernel, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- reverse-complement equivariance

def _rc_tokens(batch):
    return reverse_complement(batch)


def _real_tokens(batch=2, length=50):
    seq = _genome()
    return torch.stack([encode(seq[i * 997 : i * 997 + length]) for i in range(batch)])


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "dyt"])
def test_every_caduceus_component_commutes_with_reverse_complement(norm):
    torch.manual_seed(0)
    half, tokens = 8, _real_tokens()
    hidden = torch.randn(2, 50, 2 * half, dtype=torch.float64)
    embedding = RCPSEmbedding(7, half).double()
    torch.testing.assert_close(embedding(_rc_tokens(tokens)), rc_hidden(embedding(tokens)))
    mixer = RCPS(BiMamba(half, CaduceusOptions(state=4))).double()
    torch.testing.assert_close(mixer(rc_hidden(hidden)), rc_hidden(mixer(hidden)))
    from dyt import make_norm

    norm_layer = RCPS(make_norm(norm, half)).double()
    with torch.no_grad():
        for p in norm_layer.parameters():
            p.add_(torch.randn_like(p))  # break any symmetry of the default init
    torch.testing.assert_close(norm_layer(rc_hidden(hidden)), rc_hidden(norm_layer(hidden)))
    head = RCPSLMHead(embedding.embedding).double()
    torch.testing.assert_close(head(rc_hidden(hidden)), head(hidden).flip(1)[..., COMPLEMENT])


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("norm", ["rmsnorm", "dyt"])
def test_whole_caduceus_is_rc_equivariant_and_its_pooling_invariant(norm, tied):
    torch.manual_seed(1)
    model, tokens = _model("caduceus", norm, tied=tied), _real_tokens()
    logits, logits_rc = model(tokens), model(_rc_tokens(tokens))
    torch.testing.assert_close(logits_rc, logits.flip(1)[..., COMPLEMENT])
    pooled = model.pool(model.features(tokens), tokens)
    pooled_rc = model.pool(model.features(_rc_tokens(tokens)), _rc_tokens(tokens))
    torch.testing.assert_close(pooled_rc, pooled)


@pytest.mark.parametrize("arch,rcps", [("hyena", True), ("caduceus", True), ("caduceus", False)],
                         ids=["hyena", "caduceus-ps", "caduceus-no-rcps"])
def test_a_sequences_features_do_not_depend_on_the_padding_of_its_batch(arch, rcps):
    """A task folder's sequences of unequal length are right-padded: a short sequence's features,
    logits and pooled features are the same alone and padded beside a longer one (Caduceus' backward
    Mamba and RC half read each sequence from its own last base), and RC-equivariance still holds."""
    torch.manual_seed(2)
    model = _model(arch, "dyt", rcps=rcps).eval()
    short, long = _real_tokens(1, 30), _real_tokens(2, 50)[1:]
    batch = torch.cat([torch.nn.functional.pad(short, (0, 20), value=PAD), long])
    with torch.no_grad():
        alone, together, long_alone = model.features(short), model.features(batch), model.features(long)
        torch.testing.assert_close(together[0, :30], alone[0])
        torch.testing.assert_close(together[1], long_alone[0])
        torch.testing.assert_close(model(batch)[0, :30], model(short)[0])
        torch.testing.assert_close(model.pool(together, batch)[0], model.pool(alone, short)[0])
        if arch == "caduceus" and rcps:  # the RC of each sequence, padded the same way: equal pooled features
            rc = torch.cat([torch.nn.functional.pad(_rc_tokens(short), (0, 20), value=PAD), _rc_tokens(long)])
            torch.testing.assert_close(model.pool(model.features(rc), rc), model.pool(together, batch))


@pytest.mark.parametrize("arch", ["hyena", "caduceus"])
def test_an_untied_lm_head_has_its_own_weight_at_unit_row_norm(arch):
    """model.tied_embeddings false: the LM head reads a weight of its own, N(0, 1/width), which
    training moves apart from the embedding; tied (the default) there is no second weight."""
    torch.manual_seed(0)
    tied, untied = _model(arch, "dyt", dim=64), _model(arch, "dyt", dim=64, tied=False)
    assert tied.output is None and untied.output is not None
    width = untied.output.weight.shape[1]
    embedding = untied.embed.embedding if arch == "caduceus" else untied.embed  # Caduceus-PS: RCPSEmbedding
    assert untied.output.weight.data_ptr() != embedding.weight.data_ptr()
    # a sample std of 7 x width values (224 for Caduceus' two strands of 32): 3 standard errors, about 15%
    assert untied.output.weight.std().item() * width**0.5 == pytest.approx(1, rel=0.15)
    tokens = _real_tokens()
    untied(tokens).logsumexp(-1).sum().backward()
    assert untied.output.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="tied_embeddings: false"):
        DnaModelConfig(arch=arch, output_init_std=0.1)
    # None: the norm decides (untied for DyT only), as the tiny Caduceus config shipped it until 2026-12-06
    for norm, has_head in (("dyt", True), ("rmsnorm", False), ("layernorm", False), ("skipinit", False)):
        cfg = DnaModelConfig(arch=arch, dim=16, max_len=128, norm=NormConfig(kind=norm), tied_embeddings=None,
                             caduceus=CaduceusOptions(state=4))
        assert (build_model(cfg).output is not None) == has_head, norm


@pytest.mark.parametrize("norm", ["rmsnorm", "dyt"])
def test_classifier_head_reads_pooled_features_standardised_by_the_training_split(norm):
    """Before fine-tuning, the head's input over the training windows has mean 0 and std 1 per
    dimension (a DyT backbone's features spread less than a norm's), and the Caduceus-PS
    classifier stays reverse-complement invariant."""
    from dyt_dna.data import tokens as batch_tokens
    from dyt_dna.eval import SequenceClassifier

    torch.manual_seed(3)
    seq = _genome()
    rows = [{"sequence": seq[i * 499 : i * 499 + 40], "label": i % 2} for i in range(24)]

    def collate(batch):
        return batch_tokens([r["sequence"] for r in batch]), torch.tensor([r["label"] for r in batch])

    classifier = SequenceClassifier(_model("caduceus", norm), 2).double().fit_standardize(rows, collate, batch_size=5)
    assert classifier.training
    tokens, _ = collate(rows)
    with torch.no_grad():
        raw = classifier.pooled(tokens)
        head_input = classifier.standardize(raw)
        torch.testing.assert_close(head_input.mean(0), raw.new_zeros(raw.shape[1]), atol=1e-4, rtol=0)
        variance = raw.var(0)
        torch.testing.assert_close(head_input.std(0), (variance / (variance + Standardize.EPS * variance.mean())).sqrt(), atol=1e-4, rtol=0)
        assert not torch.allclose(raw.std(0), raw.new_ones(raw.shape[1]), atol=0.05)
        window = _real_tokens()
        torch.testing.assert_close(classifier(_rc_tokens(window)), classifier(window))


def test_sigma_reparam_classifier_computes_each_weight_once_per_forward():
    """Fine-tuning reads the backbone through ``features``, not its forward (where sigma-reparam's
    cache hooks sit): each parametrized weight is still made once per forward, so the power
    iteration steps once and Caduceus' shared layers give both directions one weight (HyenaDNA
    reads each of its linears once per forward anyway)."""
    from dyt.baselines import sigma_reparam_layers
    from dyt_dna.eval import SequenceClassifier

    torch.manual_seed(0)
    classifier = SequenceClassifier(_model("caduceus", "sigma-reparam"), 2).double().train()
    calls = {}
    for path, layer in sigma_reparam_layers(classifier.backbone):
        layer.register_forward_hook(lambda module, args, out, path=path: calls.__setitem__(path, calls.get(path, 0) + 1))
    classifier(_real_tokens())
    assert calls and set(calls.values()) == {1}, calls


def test_caduceus_without_parameter_sharing_is_not_equivariant():
    """The control that shows the equivariance tests can fail."""
    torch.manual_seed(2)
    model, tokens = _model("caduceus", "rmsnorm", rcps=False), _real_tokens()
    logits, logits_rc = model(tokens), model(_rc_tokens(tokens))
    assert (logits_rc - logits.flip(1)[..., COMPLEMENT]).abs().max() > 1e-3


# ---------------------------------------------------------------- HyenaDNA

def test_fft_long_conv_equals_direct_causal_convolution():
    torch.manual_seed(0)
    u, k, skip = torch.randn(2, 3, 33, dtype=torch.float64), torch.randn(3, 33, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    direct = torch.stack([
        torch.stack([sum(k[c, j] * u[b, c, t - j] for j in range(t + 1)) for t in range(33)]) for b in range(2) for c in range(3)
    ]).reshape(2, 3, 33) + u * skip[:, None]
    torch.testing.assert_close(fft_long_conv(u, k, skip), direct)


@pytest.mark.parametrize("norm", ["layernorm", "dyt"])
def test_hyena_future_bases_cannot_change_past_outputs(norm):
    torch.manual_seed(0)
    model = _model("hyena", norm)
    tokens = _real_tokens(1, 100)
    changed = tokens.clone()
    changed[0, 60:] = _rc_tokens(tokens)[0, 60:]
    out, out_changed = model(tokens), model(changed)
    torch.testing.assert_close(out[0, :60], out_changed[0, :60], rtol=0, atol=1e-9)
    assert (out[0, 60:] - out_changed[0, 60:]).abs().max() > 1e-3


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="longer than the model's context"):
        _model("hyena")(torch.full((1, 129), 2))


# ---------------------------------------------------------------- the norm switch

NORM_TYPES = {"layernorm": torch.nn.LayerNorm, "rmsnorm": torch.nn.RMSNorm, "dyt": DyT}


@pytest.mark.parametrize("arch,expected", [("hyena", 2 * 3 + 1), ("caduceus", 3 + 1)])
@pytest.mark.parametrize("norm", list(NORM_TYPES))
def test_norm_switch_covers_every_norm_including_the_add_norm_path(arch, expected, norm):
    model = _model(arch, norm, layers=3)
    found = list(iter_norms(model))
    assert len(found) == expected
    assert all(type(module) is NORM_TYPES[norm] for _, module, _ in found), [type(m) for _, m, _ in found]
    if norm == "dyt":
        assert not [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))]


@pytest.mark.parametrize("arch", ["hyena", "caduceus"])
def test_every_model_without_a_normalization_layer_scales_the_embedding(arch):
    """By default the sqrt(dim) scalar goes to DyT, identity and the normalization-free baselines
    alike (a baseline gets what DyT gets: docs/dna.md), never to LayerNorm / RMSNorm."""
    from dyt.norms import KINDS
    from dyt.train.config import resume_changes
    from dyt_dna.task import DnaConfig

    for kind in KINDS:
        scaler = _model(arch, kind).embed_scale
        if kind in ("layernorm", "rmsnorm"):
            assert isinstance(scaler, torch.nn.Identity), kind
        else:
            assert scaler.scale.item() == pytest.approx(4.0), kind
    # a run saved before (embedding_scale: null, the scalar for DyT only) still describes the model it built:
    # a resume or comparison of such a baseline under the new default sees the changed model
    saved = DnaConfig(model=DnaModelConfig(arch=arch, embedding_scale=None, norm=NormConfig(kind="skipinit")))
    assert not saved.model.scales_embedding()
    now = dataclasses.replace(saved, model=dataclasses.replace(saved.model, embedding_scale="no-norm"))
    fixed, _, _ = resume_changes(saved, now)
    assert any("model.embedding_scale" in change for change in fixed), fixed
    assert DnaModelConfig(arch=arch, embedding_scale=None, norm=NormConfig(kind="dyt")).scales_embedding()


# ---------------------------------------------------------------- data

def test_a_task_csv_reads_sequences_longer_than_the_csv_modules_field_limit(tmp_path):
    """csv's default field limit (131072 characters) made a longer sequence "not a readable CSV
    file"; long-context tasks have them."""
    path = tmp_path / "train.csv"
    long = "ACGT" * 50_000  # 200,000 bases
    path.write_text(f"sequence,label\n{long},a\nACGTACGT,b\n")
    assert dna_data._read_csv_split(path) == {"sequence": [long, "ACGTACGT"], "label": ["a", "b"]}


def test_a_full_disk_while_cutting_windows_is_one_line(tmp_path, monkeypatch):
    """The windows' table written to a full disk was a traceback (or the errno's bare text): one data
    error naming the cache folder and what to do."""
    import errno

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full)
    cfg = DnaDataConfig(fasta=[str(GENOME_A)], validation_fasta=[str(GENOME_B)], window=64, max_windows=5,
                        cache_dir=str(tmp_path))
    with pytest.raises(DnaDataError, match=rf"^the disk is full, or the quota spent \(No space left on device, writing "
                                           rf"in {tmp_path}, \d+ MiB free there\): free space"):
        pretraining_datasets(cfg, 128)


def test_pretraining_windows_are_cached_and_need_held_out_files(tmp_path, monkeypatch):
    cfg = DnaDataConfig(fasta=[str(GENOME_A)], validation_fasta=[str(GENOME_B)], window=64, max_windows=50,
                        cache_dir=str(tmp_path))
    train, validation = pretraining_datasets(cfg, 128)
    assert len(train) == 50 and len(validation) == 50
    assert all(len(s) == 64 for s in train["sequence"])
    assert set(train["source"]).isdisjoint(validation["source"])
    cached = {p.name for p in (tmp_path / "windows").iterdir() if p.is_dir()}
    assert len(cached) == 2  # a folder per split
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records", "windows"]  # datasets' own build copy is gone (was hf/)
    assert pretraining_datasets(cfg, 128)[0]["sequence"] == train["sequence"]
    assert {p.name for p in (tmp_path / "windows").iterdir() if p.is_dir()} == cached  # read back
    monkeypatch.setattr(dna_data, "WINDOWS_VERSION", dna_data.WINDOWS_VERSION + 1)  # as a change to _windows raises it
    pretraining_datasets(cfg, 128)
    assert len({p.name for p in (tmp_path / "windows").iterdir() if p.is_dir()} - cached) == 2  # made anew
    with pytest.raises(DnaDataError, match="validation_fasta is empty"):
        pretraining_datasets(DnaDataConfig(fasta=[str(GENOME_A)], window=64, cache_dir=str(tmp_path)), 128)
    with pytest.raises(DnaDataError, match="longer than the model's context"):
        pretraining_datasets(DnaDataConfig(fasta=[str(GENOME_A)], validation_fasta=[str(GENOME_B)], window=256), 128)
    with pytest.raises(DnaDataError, match=r"in both data.fasta and data.validation_fasta: validation would score training"):
        pretraining_datasets(DnaDataConfig(fasta=[str(GENOME_A), str(GENOME_B)], validation_fasta=[str(GENOME_B)],
                                           window=64, cache_dir=str(tmp_path)), 128)
    with pytest.raises(DnaDataError, match=r"data.fasta names .* twice .*: its windows would count twice"):
        pretraining_datasets(DnaDataConfig(fasta=[str(GENOME_A), str(GENOME_A)], validation_fasta=[str(GENOME_B)],
                                           window=64, cache_dir=str(tmp_path)), 128)


def test_a_validation_genome_that_is_mostly_trained_sequence_is_refused(tmp_path):
    """Refused once half a validation file's bases are training records, on either strand: a copy
    with one record added, or reverse-complemented, passed a check that wanted every record shared;
    a small record shared (a plasmid two strains carry) still passes."""
    rng = np.random.default_rng(0)
    chromosome, plasmid, other = ("".join(rng.choice(list("ACGT"), n)) for n in (4000, 400, 3000))
    complement = str.maketrans("ACGT", "TGCA")

    def fasta(name, *records):
        path = tmp_path / name
        path.write_text("".join(f">r{i}\n{seq}\n" for i, seq in enumerate(records)))
        return str(path)

    train = fasta("train.fa", chromosome, plasmid)
    cases = {"copy-and-more.fa": (chromosome, other[:500]), "reverse.fa": (chromosome.translate(complement)[::-1],)}
    for name, records in cases.items():
        with pytest.raises(DnaDataError, match=rf"data.validation_fasta \S*{name}: 1 of its {len(records)} record\(s\), "
                                               r"4,000 of [\d,]+ bases, are sequences of data.fasta \(\S*train.fa; "
                                               r"either strand\)"):
            pretraining_datasets(DnaDataConfig(fasta=[train], validation_fasta=[fasta(name, *records)], window=64,
                                               cache_dir=str(tmp_path / "cache")), 128)
    held = fasta("held.fa", other, plasmid)  # 400 of 3400 bases shared: biology
    pretraining_datasets(DnaDataConfig(fasta=[train], validation_fasta=[held], window=64,
                                       cache_dir=str(tmp_path / "cache")), 128)


def test_every_fasta_file_gives_windows_and_ambiguity_codes_count_as_n(tmp_path):
    """A file whose records are all shorter than the window added nothing without a word (the error
    came only where no file gave a window); IUPAC codes, which the tokenizer reads as N, did not count
    toward data.max_n_fraction (a window of RYKM... trained as all N)."""
    (tmp_path / "short.fa").write_text(">tiny\nACGTACGT\n")
    with pytest.raises(DnaDataError, match=r"short.fa: no window of 64 bases fits \(records too short"):
        pretraining_datasets(DnaDataConfig(fasta=[str(GENOME_A)], validation_fasta=[str(tmp_path / "short.fa"), str(GENOME_B)],
                                           window=64, cache_dir=str(tmp_path / "cache")), 128)
    for folder, record in (("a", "ACGT" * 40), ("b", "ACGT")):  # one name in two folders: each file judged
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "g.fa").write_text(f">r\n{record}\n")
    with pytest.raises(DnaDataError, match=r"/b/g.fa: no window of 64 bases fits"):
        pretraining_datasets(DnaDataConfig(fasta=[str(GENOME_A)], validation_fasta=[str(tmp_path / "b/g.fa"),
                                           str(tmp_path / "a/g.fa")], window=64, cache_dir=str(tmp_path / "cache")), 128)
    (tmp_path / "chr1:1-160.fa").write_text(f">r\n{'ACGT' * 40}\n")  # a region extract's name, colon and all
    pretraining_datasets(DnaDataConfig(fasta=[str(GENOME_A)], validation_fasta=[str(tmp_path / "chr1:1-160.fa")],
                                       window=64, cache_dir=str(tmp_path / "cache")), 128)
    (tmp_path / "ambiguous.fa").write_text(">r\n" + "ACGT" * 16 + "RYKMSWBD" * 8 + "ACGT" * 16 + "\n")
    windows = dna_data.window_dataset([dna_data.Region(tmp_path / "ambiguous.fa")], 64, 64, 0,
                                      DnaDataConfig(window=64, cache_dir=str(tmp_path / "cache")))
    assert windows["start"] == [0, 128]  # the window of codes is left out


def test_ranks_asking_for_the_same_windows_wait_for_the_one_building_them(tmp_path):
    """The ranks of a launch all ask for their windows at once: one builds and saves them while the
    others wait on its lock, then load what it saved (without the lock each wrote the same folder).
    Here the test holds the locks another rank would hold, in a second cache dir of the same keys."""
    from filelock import FileLock

    first = DnaDataConfig(fasta=[str(GENOME_A)], validation_fasta=[str(GENOME_B)], window=64, max_windows=50,
                          cache_dir=str(tmp_path / "first"))
    pretraining_datasets(first, 128)
    names = sorted(f"{folder.name}.lock" for folder in (tmp_path / "first" / "windows").iterdir() if folder.is_dir())
    assert len(names) == 2  # the training and the validation windows
    windows = tmp_path / "second" / "windows"  # the keys depend on the files, not on the cache dir
    windows.mkdir(parents=True)
    held = [FileLock(str(windows / name)) for name in names]
    built = {}
    rank = threading.Thread(target=lambda: built.update(rows=pretraining_datasets(
        dataclasses.replace(first, cache_dir=str(tmp_path / "second")), 128)), daemon=True)
    try:
        for lock in held:
            lock.acquire()
        rank.start()
        rank.join(timeout=3)  # unlocked, the build finishes in under a second here
        assert rank.is_alive() and not list(windows.glob("*/dataset_info.json"))
    finally:
        for lock in held:
            lock.release()
    rank.join(timeout=120)
    train, validation = built["rows"]
    assert len(train) == len(validation) == 50 and len(list(windows.glob("*/dataset_info.json"))) == 2


def test_masking_and_flips_draw_on_the_cpu_and_follow_the_batch_to_its_device(monkeypatch):
    """The trainer moves a batch to its device before the task's loss masks it: on a GPU the masks
    drawn on the CPU met a CUDA batch in torch.where and stopped Caduceus at its first step. The meta
    device stands in for CUDA here (any tensor on another device than the masks fails alike); the
    draws are the CPU generator's, so the masks are the ones a CPU run makes from the same state."""
    import torch.fx.experimental._config as fx_config

    monkeypatch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True)  # boolean indexing on meta
    torch.manual_seed(0)
    on_cpu = mask_for_mlm(_real_tokens(4, 100), 0.15)
    torch.manual_seed(0)
    inputs, targets = mask_for_mlm(_real_tokens(4, 100).to("meta"), 0.15)
    assert inputs.device.type == targets.device.type == "meta" and inputs.shape == on_cpu[0].shape
    assert dna_data.maybe_reverse_complement(_real_tokens(4, 100).to("meta")).device.type == "meta"


def test_hyena_runs_with_half_precision_weights_and_float32_buffers():
    """DeepSpeed's bf16 casts parameters, not buffers: the implicit filter's features (from its float32
    buffers) went into a bf16 linear layer and stopped HyenaDNA at its first forward."""
    model = _model("hyena").float()
    for parameter in model.parameters():  # as DeepSpeed's engine casts a module for bf16
        parameter.data = parameter.data.to(torch.bfloat16)
    assert all(b.dtype == torch.float32 for b in model.buffers())
    out = model(_real_tokens(2, 50))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_masked_lm_targets_only_chosen_positions():
    torch.manual_seed(0)
    batch = _real_tokens(4, 100)
    inputs, targets = mask_for_mlm(batch, 0.15)
    chosen = targets != -100
    assert 0.08 < chosen.float().mean() < 0.22
    assert torch.equal(targets[chosen], batch[chosen])
    assert torch.equal(inputs[~chosen], batch[~chosen])
    assert (inputs[chosen] == MASK).float().mean() > 0.6


def _write_benchmark(root: Path, seq: str, files_per_class: int = 6):
    for split in ("train", "test"):
        for label, offset in (("coding", 0), ("other", 50_000)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(files_per_class):
                start = offset + (i + (100 if split == "test" else 0)) * 80
                (folder / f"{i}.txt").write_text(seq[start : start + 60])


def test_genomic_benchmarks_folder_and_its_errors(tmp_path):
    _write_benchmark(tmp_path / "task", _genome())
    task = genomic_benchmarks(tmp_path / "task")
    assert task.classes == ["coding", "other"] and "training sequences" not in task.note  # no copies here
    assert len(task.train) + len(task.validation) == 12 and len(task.test) == 12
    assert task.check_length(128, truncate=False) is task
    with pytest.raises(DnaDataError, match="longer than the model's context .*; pass --truncate"):
        task.check_length(32, truncate=False)
    with pytest.raises(DnaDataError, match="dyt-dna-compare fine-tunes on whole sequences: .* python -m dyt_dna.eval "
                                           "--truncate"):  # the compare has no --truncate to suggest
        task.check_length(32, truncate=None)
    assert max(len(s) for s in task.check_length(32, truncate=True).test["sequence"]) == 32
    empty = tmp_path / "task" / "train" / "third"
    empty.mkdir()
    with pytest.raises(DnaDataError, match="third: label folder with no .txt files"):
        genomic_benchmarks(tmp_path / "task")
    empty.rmdir()
    for split in ("train", "test"):  # an editor's hidden folder is no class
        (tmp_path / "task" / split / ".ipynb_checkpoints").mkdir()
        (tmp_path / "task" / split / ".ipynb_checkpoints" / "0-checkpoint.txt").write_text("ACGT")
    assert genomic_benchmarks(tmp_path / "task").classes == ["coding", "other"]
    two = tmp_path / "task" / "train" / "other" / "1.txt"
    two.write_text(">r1\nACGTACGT\n>r2\nTTTTGGGG\n")  # joined, the two records made one sequence
    with pytest.raises(DnaDataError, match=r"1.txt: 2 FASTA records; a benchmark file holds one sequence"):
        genomic_benchmarks(tmp_path / "task")
    two.write_text(">r1\nACGTACGT\n")
    (tmp_path / "task" / "test" / "other" / "0.txt").write_text("ACGT?")
    with pytest.raises(AlphabetError, match=r"0.txt.*'\?'"):
        genomic_benchmarks(tmp_path / "task")


def test_a_benchmark_folder_draws_validation_by_class(tmp_path):
    """Validation takes its share of each class's training files: a draw over all files took the one
    file of a small class 1 time in 10 and left training with a single class (seen as "training needs
    at least two classes" on a folder of two), and gave two balanced classes 2 + 2 of 4 held-out
    files only 4 draws in 10."""
    seq = _genome()

    def folder(name: str, counts: dict[str, int]) -> Path:
        root = tmp_path / name
        for split, sizes in (("train", counts), ("test", {label: 3 for label in counts})):
            for offset, (label, count) in enumerate(sizes.items()):
                (root / split / label).mkdir(parents=True)
                for i in range(count):
                    start = (i + 200 * offset + (100 if split == "test" else 0)) * 70
                    (root / split / label / f"{i}.txt").write_text(seq[start : start + 60])
        return root

    balanced, small = folder("balanced", {"a": 18, "b": 18}), folder("small", {"big": 19, "small": 2})
    for seed in range(10):
        task = genomic_benchmarks(balanced, seed=seed)  # 10% of 36: 4 files, 2 of each class
        assert sorted(task.validation["label"]) == [0, 0, 1, 1] and len(task.train) == 32, seed
        task = genomic_benchmarks(small, seed=seed)  # 10% of 21: 3 files, the small class's share 0.3
        assert len(task.validation) == 3 and sorted(task.train["label"]).count(1) == 2, seed
    (small / "train" / "small" / "1.txt").unlink()
    with pytest.raises(DnaDataError, match="small: one training file; validation takes a share of each class's"):
        genomic_benchmarks(small)


def test_a_sequence_under_two_labels_is_said_in_the_task_note(tmp_path):
    """A benchmark that ships one sequence under two labels (a duplicated file sorted twice) caps the
    accuracy any classifier can reach; nothing said so, and the row read as the model's failure."""
    seq = _genome()
    window = [seq[i * 70 : i * 70 + 60] for i in range(40)]
    splits = {"train": range(0, 16), "dev": range(16, 24), "test": range(24, 32)}
    for split, indices in splits.items():
        rows = [f"{window[i]},{'yes' if i % 2 else 'no'}" for i in indices]
        (tmp_path / f"{split}.csv").write_text("sequence,label\n" + "\n".join(rows) + "\n")
    assert "labels" not in csv_task(tmp_path).note
    with open(tmp_path / "train.csv", "a") as train:  # window 0 ("no") again, as "yes"; window 1 twice as "yes"
        train.write(f"{window[0]},yes\n{window[1]},yes\n")
    with open(tmp_path / "test.csv", "a") as test:
        test.write(f"{window[0]},no\n")
    note = csv_task(tmp_path).note
    assert note.endswith("1 distinct sequence(s) carry two or more labels (2 train, 1 test rows): no classifier "
                         "scores every one of them right."), note
    folder = tmp_path / "benchmark"
    for split, indices in (("train", range(0, 12)), ("test", range(24, 30))):
        for i in indices:
            (folder / split / ("yes" if i % 2 else "no")).mkdir(parents=True, exist_ok=True)
            (folder / split / ("yes" if i % 2 else "no") / f"{i}.txt").write_text(window[i])
    assert "labels" not in genomic_benchmarks(folder).note
    (folder / "test" / "yes" / "copy.txt").write_text(window[24])  # 24 is a "no" test file
    assert "1 distinct sequence(s) carry two or more labels (2 test rows)" in genomic_benchmarks(folder).note


def test_csv_task_and_its_errors(tmp_path):
    seq = _genome()
    for split in ("train", "dev", "test"):
        rows = [f"{seq[i * 70 : i * 70 + 60]},{'yes' if i % 2 else 'no'}" for i in range(8)]
        (tmp_path / f"{split}.csv").write_text("sequence,label\n" + "\n".join(rows) + "\n")
    task = csv_task(tmp_path)
    assert task.classes == ["no", "yes"] and len(task.train) == 8 and set(task.test["label"]) == {0, 1}
    # the three files hold the same rows here: said in the task's note (the reports print it)
    assert task.note.endswith("8 of 8 validation and 8 of 8 test sequences are training sequences (either strand): "
                              "their scores measure recall, not generalisation.")
    train = tmp_path / "train.csv"
    train.write_bytes(b"\xef\xbb\xbf" + train.read_bytes())  # a byte-order mark, as spreadsheet exports write it
    assert len(csv_task(tmp_path).train) == 8
    (tmp_path / "validation.csv").write_text((tmp_path / "dev.csv").read_text())
    with pytest.raises(DnaDataError, match="both dev.csv and validation.csv: which is the validation split"):
        csv_task(tmp_path)
    (tmp_path / "validation.csv").unlink()
    test = (tmp_path / "test.csv").read_text()
    (tmp_path / "test.csv").write_text(test.replace(",no\n", ",No\n", 1))  # one row spelled otherwise
    with pytest.raises(DnaDataError, match=r"labels that differ only in case \(No / no\)"):
        csv_task(tmp_path)
    (tmp_path / "test.csv").write_text(test.replace("sequence,label", "sequence,label,label"))
    with pytest.raises(DnaDataError, match="test.csv: the header names label twice"):
        csv_task(tmp_path)
    for split in ("train", "dev", "test"):  # integer labels: in numeric order, 2 before 10
        rows = [f"{seq[i * 70 : i * 70 + 60]},{(2, 10, 3)[i % 3]}" for i in range(9)]
        (tmp_path / f"{split}.csv").write_text("sequence,label\n" + "\n".join(rows) + "\n")
    assert csv_task(tmp_path).classes == ["2", "3", "10"]
    (tmp_path / "dev.csv").write_text("seq,label\nACGT,no\n")
    with pytest.raises(DnaDataError, match=r"dev.csv: missing column\(s\) \['sequence'\]"):
        csv_task(tmp_path)


def test_coding_windows_lie_inside_genes_and_non_coding_touch_none(tmp_path, monkeypatch):
    monkeypatch.setenv("DYT_CACHE", str(tmp_path))
    genome = Genome("test", "NCTC11397", GENOME_B)
    spans = _gene_spans(genome)
    seq = _genome()
    coding, noncoding = _coding_windows(genome, 0, 1, 100, 20)
    assert len(coding) == 20 and len(noncoding) >= 5
    covered = torch.zeros(len(seq), dtype=torch.bool)
    for begin, end in spans:
        covered[begin:end] = True
    for window in noncoding:
        start = seq.index(window)
        assert not covered[start : start + 100].any()
    for window in coding:
        start = seq.index(window)
        assert any(b <= start and start + 100 <= e for b, e in spans)


def test_gene_calls_are_cached_by_pyrodigal_version_and_their_own(tmp_path, monkeypatch):
    """The coding and start tasks' labels come from pyrodigal's calls: a newer pyrodigal, or a change
    to how they are called, must call the genes again, not read the old calls back."""
    import pyrodigal

    monkeypatch.setenv("DYT_CACHE", str(tmp_path))
    genome = Genome("test", "NCTC11397", GENOME_B)
    calls = dna_data._cache_dir("") / "genes-stranded"
    genes = _genes(genome)
    assert len(list(calls.iterdir())) == 1 and _genes(genome) == genes  # read back
    monkeypatch.setattr(dna_data, "GENES_VERSION", dna_data.GENES_VERSION + 1)
    assert _genes(genome) == genes and len(list(calls.iterdir())) == 2
    monkeypatch.setattr(pyrodigal, "__version__", "0.0.1")
    _genes(genome)
    assert len(list(calls.iterdir())) == 3


def test_start_windows_centre_on_start_codons_matched_codon_by_codon(tmp_path, monkeypatch):
    """Both classes centre on a start-like codon in frame of a called gene (the start itself, or
    one at least 60 bases in), with the same codons in each class: only context tells them apart."""
    monkeypatch.setenv("DYT_CACHE", str(tmp_path))
    genome = Genome("test", "NCTC11397", GENOME_B)
    genes, seq = _genes(genome), _genome()
    starts, internal = _start_windows(genome, 0, 1, 100, 30)
    assert len(starts) == len(internal) >= 20

    def centre_codon(window: str) -> tuple[int, str]:
        at = seq.index(window) + 50
        if any(strand == 1 and b <= at < e and (at - b) % 3 == 0 for b, e, strand in genes):  # in frame, forward
            return at, seq[at : at + 3]
        assert any(strand == -1 and b < at <= e and (e - at) % 3 == 0 for b, e, strand in genes)
        return at, seq[at - 3 : at][::-1].translate(str.maketrans("ACGT", "TGCA"))

    gene_starts = {(b if strand == 1 else e) for b, e, strand in genes}
    assert all(centre_codon(w)[0] in gene_starts for w in starts)
    assert not any(centre_codon(w)[0] in gene_starts for w in internal)
    codons = lambda windows: sorted(centre_codon(w)[1] for w in windows)  # noqa: E731
    assert codons(starts) == codons(internal) and set(codons(starts)) <= {"ATG", "GTG", "TTG"}


# ---------------------------------------------------------------- training and fine-tuning

@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_pretraining_then_fine_tuning(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "DYT_CACHE": str(tmp_path / "cache")}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "dyt_dna.train",
           "--config", str(ROOT / "recipes/dna/caduceus-tiny.yaml"), "--set", "model.norm=dyt",
           "--set", f"data.fasta=[{GENOME_A}]", "--set", f"data.validation_fasta=[{GENOME_B}]",
           "--set", "data.window=64", "--set", "data.max_windows=64", "--set", "model.dim=16",
           "--set", "train.steps=3", "--set", "train.micro_batch_size=4", "--set", "train.eval_every=3",
           "--set", "train.log_every=1", "--set", "train.progress=false", "--set", f"train.out_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and math.isfinite(rows[-1]["eval/loss"])
    assert "alpha/final_norm.module" in rows[-1]

    from dyt_dna.eval import main as evaluate

    _write_benchmark(tmp_path / "bench", _genome(), files_per_class=16)
    results = evaluate(["--run", str(tmp_path / "run"), "--task", str(tmp_path / "bench"), "--seeds", "0", "1",
                        "--epochs", "2", "--batch-size", "8"])
    assert len(results) == 2
    for r in results:  # the confusion matrix covers the 2 x 16 test files, and the accuracy is read from it
        confusion = r.details["test"]
        assert len(confusion) == 2 and sum(map(sum, confusion)) == 32
        assert r.test["test"]["accuracy"] == pytest.approx((confusion[0][0] + confusion[1][1]) / 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mamba_ssm's kernel needs CUDA")
def test_mamba_ssm_kernel_agrees_with_the_pure_scan():
    pytest.importorskip("mamba_ssm")
    from dyt_dna.scan import scan

    torch.manual_seed(0)
    b, d, n, length = 2, 64, 16, 1000
    x, dt = torch.randn(b, d, length, device="cuda"), torch.randn(b, d, length, device="cuda") - 2
    A = -torch.arange(1, n + 1.0, device="cuda").repeat(d, 1)
    B, C = torch.randn(b, n, length, device="cuda"), torch.randn(b, n, length, device="cuda")
    D, bias = torch.ones(d, device="cuda"), torch.zeros(d, device="cuda")
    kernel = scan(x, dt, bias, A, B, C, D, use_kernel=True)
    pure = scan(x, dt, bias, A, B, C, D, use_kernel=False)
    torch.testing.assert_close(kernel, pure, rtol=1e-3, atol=1e-3)


def _fake_run(root: Path, max_len: int = 128) -> Path:
    """A pretraining run directory (config + one complete checkpoint) of a tiny untrained HyenaDNA."""
    from dyt.train.config import dump_yaml
    from dyt_dna.config import HyenaOptions
    from dyt_dna.data import DnaDataConfig
    from dyt_dna.task import DnaConfig

    config = DnaConfig(model=DnaModelConfig(arch="hyena", dim=8, layers=1, max_len=max_len,
                                            hyena=HyenaOptions(filter_order=8)), data=DnaDataConfig(window=max_len))
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(dump_yaml(config))
    checkpoint = root / "checkpoints" / "step_00000001"
    checkpoint.mkdir(parents=True)
    torch.save({"module": build_model(config.model).state_dict()}, checkpoint / "mp_rank_00_model_states.pt")
    (checkpoint / "COMPLETE").write_text('{"step": 1, "world_size": 1}')
    return root


def test_fine_tuning_eval_validates_every_quarter_of_the_steps(tmp_path):
    from dyt_dna.eval import main as evaluate

    _write_benchmark(tmp_path / "bench", _genome(), files_per_class=16)  # 28 train / 4 validation files
    results = evaluate(["--run", str(_fake_run(tmp_path / "run")), "--task", str(tmp_path / "bench"),
                        "--seeds", "0", "--epochs", "2", "--batch-size", "4", "--patience", "10"])
    # 7 steps per epoch, 14 in all: docs/dna.md's "validation every quarter of the steps"
    assert [row["step"] for row in results[0].curve] == [4, 8, 12, 14]


def test_the_eval_writes_each_seed_to_out_as_it_finishes_and_resumes_from_it(tmp_path, monkeypatch, capsys):
    """A kill in the second seed keeps the first seed's row in ``--out`` (the file was written only
    at the end: a kill lost every finished fine-tuning), and the same command again reads it back
    and fine-tunes the second seed alone (it recomputed every seed, and replaced the file at the
    first one). The file names what it measured: the run, its checkpoint's step, the settings."""
    import json

    import dyt_dna.eval as dna_eval

    real_finetune, calls = dna_eval.finetune, []

    def killed_on_the_second_seed(*args, **kwargs):
        calls.append(args[7])  # the seed
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_finetune(*args, **kwargs)

    monkeypatch.setattr(dna_eval, "finetune", killed_on_the_second_seed)
    _write_benchmark(tmp_path / "bench", _genome(), files_per_class=16)
    out, run = tmp_path / "results.json", _fake_run(tmp_path / "run")
    command = ["--run", str(run), "--task", str(tmp_path / "bench"), "--seeds", "3", "5", "--epochs", "1",
               "--batch-size", "8", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        dna_eval.main(command)
    assert calls == [3, 5]
    stored = json.loads(out.read_text())["evals"]["bench"]
    assert [(row["seed"], row["task"], row["device"], row["run"]) for row in stored["seeds"].values()] == [
        (3, "bench", "cpu", str(run))]
    settings = stored["settings"]
    assert settings["checkpoint_step"] == 1 and settings["pretrained"] and len(settings["run_config"]) == 16
    assert settings["finetune"]["epochs"] == 1 and settings["task_files"]["task"] == "bench"
    capsys.readouterr()
    results = dna_eval.main(command)
    assert calls == [3, 5, 5] and [r.seed for r in results] == [3, 5]
    said = capsys.readouterr().out
    assert f"{run}: checkpoint step 1 of " in said and "bench: seeds [3] read back from" in said and "computing [5]" in said
    assert list(json.loads(out.read_text())["evals"]["bench"]["seeds"]) == ["3", "5"]
    assert [r.seed for r in dna_eval.main(command)] == [3, 5] and calls == [3, 5, 5]  # all read back


def test_the_eval_refuses_an_out_that_holds_something_else(tmp_path, capsys):
    """``--out`` was overwritten whatever it held: another eval's seeds (``--random-init`` into the
    same file replaced the pretrained rows, and nothing in the file said which it was) or the run's
    own config.yaml, given by mistake. Such a file is now refused in one line, before any fine-tuning."""
    import json

    from dyt_dna.eval import main as evaluate

    _write_benchmark(tmp_path / "bench", _genome(), files_per_class=4)
    run, out = _fake_run(tmp_path / "run"), tmp_path / "results.json"
    command = ["--run", str(run), "--task", str(tmp_path / "bench"), "--seeds", "0", "--batch-size", "4",
               "--epochs", "1", "--out", str(out)]

    def refused(argv: list[str]) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            evaluate(argv)
        assert stopped.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    evaluate(command)
    before = out.read_text()
    assert refused([*command[:-3], "2", "--out", str(out)]) == (
        f"dyt_dna.eval: output error: --out {out} holds bench results of other settings (finetune.epochs 1 -> 2): "
        "give another --out, or delete it to replace them")
    assert out.read_text() == before
    evaluate([*command, "--random-init"])  # the untrained row is stored beside the pretrained one
    assert sorted(json.loads(out.read_text())["evals"]) == ["bench", "bench-random-init"]
    before = out.read_text()
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("seed: 0", "seed: 7"))  # the run trained anew, in the same folder
    assert "holds bench results of other settings (run_config '" in refused(command)
    assert out.read_text() == before
    kept = config.read_text()
    assert refused([*command[:-1], str(config)]) == (
        f"dyt_dna.eval: output error: --out {config} exists and is not a results file an eval writes (since "
        "2026-12-07): give another --out; nothing was written to it")
    assert config.read_text() == kept
    out.write_text(json.dumps([{"seed": 0}]))  # what --out held before 2026-12-07
    assert "is not a results file an eval writes" in refused(command)


def test_the_eval_by_itself_fine_tunes_as_the_compare_does(tmp_path, monkeypatch):
    """``python -m dyt_dna.eval`` on a compare's checkpoint gives the report's numbers only with the
    compare's fine-tuning settings: both commands' defaults must be one set (docs/dna.md's; the eval
    had its own window, examples per class, epochs, batch and no step cap)."""
    import dyt_dna.compare as dna_compare
    import dyt_dna.eval as dna_eval
    from dyt.train.finetune import FinetuneConfig

    documented = FinetuneConfig(epochs=4, batch_size=16, lr=1e-3, patience=3, max_steps=40)
    seen = {}

    class Captured(Exception):
        pass

    def capture(key):
        def record(*args, **kwargs):
            seen[key] = args
            raise Captured
        return record

    monkeypatch.setattr(dna_compare, "plan_runs", capture("compare"))
    with pytest.raises(Captured):
        dna_compare.main(["--out", str(tmp_path / "cmp")])
    compare = seen["compare"][1]
    assert (compare.eval_window, compare.per_class) == (128, 100)
    assert dna_eval.finetune_settings(compare) == documented and dna_eval.finetune_seeds(compare) == [0, 1, 2]

    run = _fake_run(tmp_path / "run")
    with monkeypatch.context() as patched:
        patched.setattr(dna_eval, "load_task", capture("window"))
        with pytest.raises(Captured):
            dna_eval.main(["--run", str(run)])  # a built-in task: cut to --eval-window
    assert seen["window"][1:] == (128, 100)
    _write_benchmark(tmp_path / "bench", _genome(), files_per_class=16)
    monkeypatch.setattr(dna_eval, "evaluate", capture("eval"))
    with pytest.raises(Captured):
        dna_eval.main(["--run", str(run), "--task", str(tmp_path / "bench")])
    task, cfg, seeds = seen["eval"][1:4]
    assert cfg == dna_eval.finetune_for(documented, len(task.train)) and seeds == [0, 1, 2]


def test_the_compare_and_the_eval_validate_four_times_over_the_steps_they_take():
    """``dyt-dna-compare`` used ``max_steps // 4``: every step with ``--max-steps 0`` (epochs
    decide), and fewer than four validations when epochs end before ``max_steps``."""
    from dyt.train.finetune import FinetuneConfig
    from dyt_dna.eval import finetune_for

    def cadence(**options):
        return finetune_for(FinetuneConfig(epochs=4, batch_size=16, **options), 400).eval_every

    assert cadence(max_steps=40) == 10  # the compare's defaults: 40 of 100 planned steps
    assert cadence(max_steps=0) == 25  # epochs decide: 4 x 25 batches
    assert cadence(max_steps=160) == 25  # epochs end at 100, before max_steps
    assert cadence(max_steps=2) == 1


def test_truncate_note_is_printed_and_saved(tmp_path, capsys):
    import json

    from dyt_dna.eval import main as evaluate

    _write_benchmark(tmp_path / "bench", _genome(), files_per_class=4)  # 60-base sequences
    out = tmp_path / "results.json"
    evaluate(["--run", str(_fake_run(tmp_path / "run", max_len=32)), "--task", str(tmp_path / "bench"),
              "--seeds", "0", "1", "--epochs", "1", "--batch-size", "4", "--truncate", "--out", str(out)])
    printed = [line for line in capsys.readouterr().out.splitlines() if "cut to" in line]
    assert len(printed) == 1 and "32 bases" in printed[0], printed
    saved = list(json.loads(out.read_text())["evals"]["bench"]["seeds"].values())
    assert len(saved) == 2 and all("cut to their first 32 bases" in row["note"] for row in saved)


def test_random_init_eval_starts_from_fresh_weights_not_the_checkpoint(tmp_path, monkeypatch):
    """The random-init row fine-tunes the run's model untrained: the checkpoint is never read, and
    the pretrained row starts from exactly the checkpoint's weights."""
    import dyt_dna.eval as dna_eval

    _write_benchmark(tmp_path / "bench", _genome(), files_per_class=4)
    run = _fake_run(tmp_path / "run")
    saved = torch.load(next(run.glob("checkpoints/*/mp_rank_00_model_states.pt")))["module"]
    with torch.no_grad():
        for value in saved.values():
            value.fill_(0.125)  # a checkpoint no fresh initialisation can equal
    torch.save({"module": saved}, next(run.glob("checkpoints/*/mp_rank_00_model_states.pt")))
    starts = []
    real_finetune = dna_eval.finetune

    def spy(make_model, *args, **kwargs):
        starts.append(make_model().backbone.state_dict())
        return real_finetune(make_model, *args, **kwargs)

    monkeypatch.setattr(dna_eval, "finetune", spy)
    task = dna_eval.load_task(str(tmp_path / "bench"), 60, 4)
    cfg = dna_eval.FinetuneConfig(epochs=1, batch_size=4)
    list(dna_eval.evaluate(run, task, cfg, [0], pretrained=True))
    assert all(torch.equal(starts[0][k], saved[k]) for k in saved)
    import dyt.train.checkpoint as checkpoint  # where run_model_builder reads the weights

    monkeypatch.setattr(checkpoint, "trained_weights", lambda _: pytest.fail("random init read the checkpoint"))
    list(dna_eval.evaluate(run, task, cfg, [0], pretrained=False))
    assert not all(torch.equal(starts[1][k], saved[k]) for k in saved)


def test_the_classifier_is_built_and_fine_tuned_on_the_device_asked_for(tmp_path, monkeypatch):
    """``--device`` reaches the fine-tuning, and the classifier it trains is built there, its head's
    input statistics fitted there from the training split (every parameter and buffer on the
    device; a DyT trained with a backend that cannot run there gets ``auto``). The meta device
    stands in for a GPU: shapes flow through it, no value is read (Caduceus reads its sequences'
    real lengths, so HyenaDNA is the model here)."""
    import dyt_dna.eval as dna_eval

    _write_benchmark(tmp_path / "bench", _genome(), files_per_class=4)
    run = _fake_run(tmp_path / "run")
    seen = []

    class Asked(Exception):
        pass

    def asked(*args, device, **kwargs):
        seen.append(device)
        raise Asked

    monkeypatch.setattr(dna_eval, "evaluate", asked)
    with pytest.raises(Asked):
        dna_eval.main(["--run", str(run), "--task", str(tmp_path / "bench"), "--random-init", "--device", "cpu"])
    assert seen == [torch.device("cpu")]
    monkeypatch.undo()

    # a DyT run trained with the CPU kernels: on another device the evals give its DyT 'auto'
    from dyt.train import dump_yaml, load_config
    from dyt_dna.task import DnaConfig

    config = load_config(DnaConfig, run / "config.yaml", ["model.norm=dyt", "model.norm.backend=cpu"], check_files=False)
    (run / "config.yaml").write_text(dump_yaml(config))
    meta, built = torch.device("meta"), []
    monkeypatch.setattr(dna_eval, "finetune", lambda make_model, *args, device, **kwargs: built.append(
        (make_model(), device)))
    task = dna_eval.load_task(str(tmp_path / "bench"), 60, 4)
    with pytest.warns(UserWarning, match="model.norm.backend cannot run here .* the evals use DyT backend 'auto'"):
        list(dna_eval.evaluate(run, task, dna_eval.FinetuneConfig(epochs=1, batch_size=4), [0, 1], pretrained=False,
                               device=meta))
    assert [device for _, device in built] == [meta, meta]  # where finetune moves the head too
    for model, _ in built:
        assert {t.device for t in [*model.backbone.parameters(), *model.standardize.buffers()]} == {meta}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_the_fine_tuning_eval_runs_on_its_device(tmp_path, device):
    """The eval's whole path (build, standardising, fine-tuning, scoring) runs on the device given
    (on a GPU machine, there)."""
    import dyt_dna.eval as dna_eval

    _write_benchmark(tmp_path / "bench", _genome(), files_per_class=4)
    run = _fake_run(tmp_path / "run")
    task = dna_eval.load_task(str(tmp_path / "bench"), 60, 4)
    (result,) = dna_eval.evaluate(run, task, dna_eval.FinetuneConfig(epochs=1, batch_size=4, max_steps=2), [0],
                                  device=torch.device(device))
    assert 0 <= result.test["test"]["accuracy"] <= 1
