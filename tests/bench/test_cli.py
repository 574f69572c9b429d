"""`kdprune bench`: thin over the library; --report-only writes the table from the JSONL."""
import json

from kdprune.cli.main import main

from .test_report import LINES


def test_bench_report_only_and_errors(tmp_path, capsys):
    (tmp_path / "b.yaml").write_text("base: base\ntargets: [{flops: 0.5}]\nresults: out/r.jsonl\nruns: runs\n"
                                     "methods: [{label: l1, method: l1}]\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LINES))
    assert main(["bench", str(tmp_path / "b.yaml"), "--report-only", "--no-latency"]) == 0
    out = capsys.readouterr().out
    assert "88.50 ± 0.71 (2)" in out and (tmp_path / "out" / "r_pareto_flops.png").is_file()
    assert main(["bench", str(tmp_path / "b.yaml"), "--only", "zzz"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "choose from control, l1" in err[0]
