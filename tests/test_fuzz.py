"""A seeded subset of the fuzz suite (tests/fuzz.py; `make fuzz` runs 1,000 cases): every
mutated artifact (TorchScript and .pt2), checkpoint, .npy, PNG and JPEG ends in a clean error or
in exactly the intact file's output (or, for an input file or checkpoint that still decodes, in
the independent reference's answer), and no .pt2 load leaves files in TMPDIR. About a minute
and a half (the .pt2 is compiled here)."""

import fuzz

CASES = 60


def test_fuzz_subset(digits_artifact, tmp_path):
    summary = fuzz.fuzz(CASES, seed=20240, timeout=120, work=tmp_path, log=print, artifact=digits_artifact)
    fuzz.print_summary(summary)
    assert sum(summary["totals"].values()) == CASES
    assert set(summary["by_target"]) == set(fuzz.MIX)  # every file kind and entry point ran
    failures = [f"{f['target']} {f['mutation']}: {f['outcome']}: {f['detail'][:200]}" for f in summary["failures"]]
    assert not failures, "\n".join(failures)
