"""Fuzzed readers and killed writers (benchmarks/faults.py runs the long version)."""

import random

import pytest

from benchmarks import faults, faults_hf


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    data = faults.make_data(work / "data")
    base, comp = work / "base", work / "d2"
    assert faults.cli("train", "--data", data, "--epochs", 1, "--out", base, *faults.TINY)[0] == 0
    assert faults.cli("compress", base, "--rank", 2, "--out", comp)[0] == 0
    return work, data, base, comp


def only_ok_or_refused(counts):
    assert set(counts) <= {"ok", "refused"}, counts
    assert counts.get("refused", 0) > 0


def test_fuzzed_idx_files_load_correctly_or_are_refused_in_one_line(runs):
    work, _, base, _ = runs
    only_ok_or_refused(faults.fuzz_idx(work, base, 40, random.Random(0)))


def test_fuzzed_metadata_loads_the_same_model_or_is_refused_in_one_line(runs):
    work, _, _, comp = runs
    counts = faults.fuzz_meta(work, comp, 60, random.Random(1))
    only_ok_or_refused(counts)
    assert counts.get("ok", 0) > 0  # harmless edits (metrics, history) still load the same model


def test_fuzzed_weights_are_always_refused(runs):
    work, _, _, comp = runs
    assert faults.fuzz_weights(work, comp, 40, random.Random(2)) == {"refused": 40}


def test_fuzzed_checkpoints_resume_identically_or_are_refused(runs):
    work, data, _, _ = runs
    only_ok_or_refused(faults.fuzz_checkpoint(work, data, 30, random.Random(3)))


@pytest.mark.slow
def test_a_killed_compress_or_train_leaves_the_old_run_or_the_new_one(runs):
    work, data, base, _ = runs
    counts = faults.kill_runs(work, base, data, 2, random.Random(4))
    assert set(counts) <= {"old run", "new run"} and sum(counts.values()) == 4, counts


@pytest.mark.parametrize("target", [t for t in faults_hf.TARGETS if t != "bert/vocab.txt"])
def test_fuzzed_hugging_face_source_files_are_refused_or_compress_from_the_files_weights(runs, target):
    pytest.importorskip("transformers")
    work = runs[0]
    sources = faults_hf.make_sources(work / f"hf-{target.replace('/', '-')}")
    counts = faults_hf.fuzz_source(work, sources, target, 12, random.Random(5), faults.cli, faults.outcome,
                                   faults.mutate_bytes, faults.mutate_json)
    assert set(counts) <= {"ok", "refused"}, counts
