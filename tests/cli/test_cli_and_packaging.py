"""The console script, the README's commands and the package layout."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from mmeff.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def test_repo_folders_do_not_shadow_pypi_packages():
    # datasets/ and kernels/ are mmeff.datasets / mmeff.kernels, never top-level modules
    for name in ("datasets", "kernels"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin is not None:
            assert not Path(spec.origin).resolve().is_relative_to(ROOT), f"{name} resolves into the repo"
    import mmeff.datasets
    import mmeff.kernels

    assert Path(mmeff.datasets.__file__).parent.resolve() == ROOT / "datasets"
    assert Path(mmeff.kernels.__file__).parent.resolve() == ROOT / "kernels"


def test_repo_root_on_sys_path_still_imports_the_pypi_packages():
    # `python -m ...` / torchrun from a checkout put the repo root first on sys.path; transformers then
    # imports PyPI's `kernels`, which our kernels/ folder must hand over to instead of shadowing.
    import subprocess
    import sys

    code = ("import importlib.util, sys\n"
            "for name in ('kernels', 'datasets'):\n"
            "    try:\n"
            "        m = __import__(name)\n"
            "        print(name, getattr(m, '__file__', None) or 'missing: no file')\n"
            "    except ImportError as e:\n"
            "        print(name, 'missing', e)\n"
            "import mmeff.kernels, mmeff.datasets.media\n"
            "print('mmeff', mmeff.kernels.__file__, len(mmeff.kernels.__all__))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    for name in ("kernels", "datasets"):
        assert lines[name].startswith("missing") or str(ROOT) not in lines[name], lines[name]
    assert lines["mmeff"].startswith(str(ROOT / "kernels" / "__init__.py"))


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- commands -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README must keep its two set-up commands in the marked bash block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_has_two_commands_and_ci_runs_the_test_one():
    cmds = _readme_commands()
    assert len(cmds) == 2
    main_job, tests = cmds
    assert "mmeff bench" in main_job and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, ".ci/run must run exactly the README's test command"


def test_the_oldest_transformers_tested_is_the_pins_lower_bound():
    pin = re.search(r'"transformers>=([0-9.]+),<([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    oldest = re.search(r'^OLDEST="([0-9.]+)"', (ROOT / "scripts" / "test_oldest_transformers.sh").read_text(), re.M)
    assert pin and oldest, "pyproject must pin transformers>=A,<B and the script must name OLDEST"
    assert oldest.group(1).startswith(pin.group(1) + "."), (oldest.group(1), pin.group(1))
    assert "test_oldest_transformers.sh" in _readme_commands()[1]


def test_list_shows_reducers_and_adapters(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("random", "uniform", "pool", "cls_attn", "llava", "qwen2_vl", "timm_vit", "open_clip"):
        assert re.search(rf"^\s+{name}\s", out, re.M), name


def _list_sections(out: str) -> dict[str, list[str]]:
    """``mmeff list``'s output as heading -> the names listed under it."""
    sections: dict[str, list[str]] = {}
    for line in out.splitlines():
        if not line.startswith(" "):
            heading = line.split(" (")[0].rstrip(":")
            sections[heading] = []
        elif line.strip() != "(none registered)":
            sections[heading].append(line.split()[0])
    return sections


def test_list_is_the_catalogue_kind_by_kind(capsys):
    from mmeff.core import KINDS, catalogue

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    sections = _list_sections(out)
    assert list(sections) == ["reducers", "in-tower methods", "KV-cache presses", "quantizers", "models", "adapters",
                              "VLM hosts"]
    assert len(sections) == len(KINDS) + 1
    # every entry of the one registry, once, under its kind's heading
    for heading, kind in zip(sections, KINDS):
        assert sections[heading] == [e.name for e in catalogue(kind)], kind
    assert {"tome", "tocom", "vistog"} <= set(sections["in-tower methods"])
    assert {"tome", "tocom", "vistog", "kv_cache"} <= set(sections["adapters"])
    assert {"sepllm", "streamingllm", "full"} <= set(sections["KV-cache presses"])
    assert {"fourier", "freevideo"} <= set(sections["reducers"])
    models = set(sections["models"])
    for name in ("squeezetime_k400", "instruct_ipt_small", "cdt_mini", "eve_smollm2", "mmeff-mini"):
        assert name in models, name
    # one line each, with its one-line summary
    assert re.search(r"^\s+mmeff-mini\s+the embedded default VLM", out, re.M)
    assert re.search(r"^\s+tome\s+\S", out, re.M)


ISSUE_36_HOSTS = ("LlavaForConditionalGeneration", "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                  "Qwen3VLForConditionalGeneration", "LlavaNextForConditionalGeneration",
                  "LlavaNextVideoForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
                  "Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration",
                  "InternVLForConditionalGeneration", "Gemma3ForConditionalGeneration")


def test_list_shows_every_vlm_host_supported_or_refused_with_the_reason(capsys):
    import transformers
    from torch import nn

    from mmeff.adapters import find_adapter

    assert main(["list"]) == 0
    hosts = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.split("VLM hosts")[1].splitlines()[1:]}
    assert set(ISSUE_36_HOSTS) <= set(hosts)
    assert all(hosts[name] != "refused" for name in ISSUE_36_HOSTS)
    assert {"Idefics2ForConditionalGeneration", "Mistral3ForConditionalGeneration"} <= {n for n, a in hosts.items() if a == "refused"}
    for name in hosts:
        cls = getattr(transformers, name)
        model = nn.Module.__new__(cls)  # an instance of the real class, without building its weights
        nn.Module.__init__(model)
        if hosts[name] == "refused":
            with pytest.raises(TypeError, match=f"{name} is not supported: not adapted.{{40,}}"):
                find_adapter(model)
        else:
            assert find_adapter(model).name == hosts[name], name


def test_bench_on_tiny_model_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc = main(["bench", "tokens", "--model", "tiny-llava", "--media", "image", "--repeats", "1", "--decode-tokens", "2",
               "--answer-tokens", "3", "--methods", "pool,random", "--json", str(path)])
    assert rc == 0
    data = json.loads(path.read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"none", "pool(ratio=0.25)", "random(ratio=0.25, seed=0)"}
    assert rows["none"]["visual_tokens"] == 64 and rows["pool(ratio=0.25)"]["stage"] == "post_projector"
    assert rows["pool(ratio=0.25)"]["visual_tokens"] == 16
    assert rows["none"]["token_agreement"] == 1.0 and rows["none"]["kl_next_token"] == pytest.approx(0, abs=1e-6)
    assert rows["pool(ratio=0.25)"]["llm_prefill_gflops"] < rows["none"]["llm_prefill_gflops"]
    assert all(r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 for r in rows.values())
    out = capsys.readouterr().out
    assert "vis tok" in out and "pool(ratio=0.25)" in out


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "tokens", "--model", "tiny-llava", "--methods", "nope"]) == 2
    assert "unknown method(s) ['nope']" in capsys.readouterr().err
    assert main(["bench", "--methods", "nope"]) == 2  # the scenes suite checks names before loading a model
    assert "unknown method(s) ['nope']" in capsys.readouterr().err
    assert main(["bench", "--model", "tiny-llava"]) == 2
    assert "scenes bench runs LLaVA models with a chat tokenizer" in capsys.readouterr().err
    assert main(["bench", "--ratio", "1.5"]) == 2
    assert main(["bench", "--model", "/no/such/folder"]) == 2
    assert "no such folder: /no/such/folder" in capsys.readouterr().err


def test_token_agreement_handles_early_eos():
    import torch

    from mmeff.bench.reduction import token_agreement

    ref = torch.tensor([[1, 2, 3, 4]])
    assert token_agreement(ref, ref) == 1.0
    assert token_agreement(torch.tensor([[1, 2]]), ref) == 0.5  # stopped early: the rest disagrees
    assert token_agreement(torch.tensor([[1, 9, 3, 4]]), ref) == 0.75
    # the reference stopped at once: no broadcasting of a length-1 answer over a longer one
    assert token_agreement(torch.tensor([[2, 2, 5]]), torch.tensor([[2]])) == pytest.approx(1 / 3)


def test_fourier_benchmark_script_accounting(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "acc.json"
    proc = subprocess.run([sys.executable, "-m", "mmeff.bench.fourier", "--accounting-only", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "up to 83.8%" in proc.stdout and "8 text: 83.8%" in proc.stdout
    rows = json.loads(out.read_text())["accounting"]
    pre64 = next(r for r in rows if r["model"] == "llava-1.5-7b" and r["visual_tokens"] == 64 and r["stage"] == "pre")
    assert round(pre64["total_saved"], 3) == 0.770


def test_every_import_the_readme_shows_works() -> None:
    # each `import` / `from ... import` line of the README's python blocks, run as written (continuation
    # lines of a parenthesised import joined); a name the README promises must exist
    text = (ROOT / "README.md").read_text()
    lines: list[str] = []
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        pending = ""
        for line in block.splitlines():
            stripped = line.strip()
            if pending:
                pending += " " + stripped
                if ")" in stripped:
                    lines.append(pending)
                    pending = ""
            elif re.match(r"(from \S+ import |import )", stripped):
                code = stripped.split("#")[0].strip()
                if code.endswith("("):
                    pending = code
                else:
                    lines.append(code)
    assert len(lines) >= 10, lines
    for code in lines:
        try:
            exec(compile(code, "README.md", "exec"), {})
        except ImportError as e:
            pytest.fail(f"README import fails: {code!r}: {e}")


@pytest.mark.parametrize("argv, message", [
    (["bench", "squeezetime", "--squeezetime-epochs", "0"], "--squeezetime-epochs must be at least 1, got 0"),
    (["demo", "--port", "99999"], "--port must be in 1..65535, got 99999"),
    (["bench", "--ratio", "2"], "--ratio must be in (0, 1], got 2.0"),
    (["bench", "--ratio", "half"], None),  # argparse's own usage error
])
def test_cli_bad_arguments_get_one_line(argv, message, capsys) -> None:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    if message:
        assert err.strip() == f"mmeff: {message}"


def test_cli_device_cuda_without_a_gpu(capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "sepllm", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_cli_failures_are_one_line_unless_debugging(tmp_path, capsys, monkeypatch) -> None:
    import argparse

    from mmeff.cli import listing

    def fails(exc: BaseException) -> None:
        def command(args: argparse.Namespace) -> int:
            raise exc
        monkeypatch.setattr(listing, "_cmd_list", command)  # build_parser reads it on every main()

    fails(IsADirectoryError(21, "Is a directory", str(tmp_path)))
    assert main(["list"]) == 2
    assert capsys.readouterr().err.strip() == f"mmeff: error: Is a directory ({tmp_path})"
    fails(RuntimeError("something broke\nsecond line"))
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: something broke" in err and "MMEFF_DEBUG=1" in err
    with pytest.raises(RuntimeError):
        main(["--debug", "list"])
    monkeypatch.setenv("MMEFF_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["list"])
    # a folder where a checkpoint file is expected is called a folder, not "not found"
    monkeypatch.delenv("MMEFF_DEBUG")
    from mmeff.checkpoint import load_state

    with pytest.raises(ValueError, match="is a folder, not a checkpoint file"):
        load_state(tmp_path)


def test_console_script_prints_no_traceback(tmp_path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mmeff.cli", "demo", "--port", "99999"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().startswith("mmeff: --port")


def test_mistyped_local_paths_fail_at_once_and_hub_ids_pass_through(tmp_path, capsys, monkeypatch) -> None:
    from mmeff.checkpoint import local_or_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    assert local_or_hub("here") == "here" and local_or_hub(str(tmp_path)) == str(tmp_path)
    assert local_or_hub("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert local_or_hub("gpt2") == "gpt2"
    for typo in ("./typo", "../typo", "~/typo", "/no/such", "a/b/c", "typo/"):
        with pytest.raises(FileNotFoundError, match="no such folder"):
            local_or_hub(typo)
    # the commands that take a model reference say so in one line, before any model or hub is touched
    for argv in (["eval", "videoqa", "--model", "./typo", "--out", str(tmp_path / "o.jsonl")],
                 ["bench", "sepllm", "--model", "./typo"], ["bench", "flatquant", "--model", "./typo"],
                 ["eve", "eval", "--model", "./typo"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.strip() == "mmeff: error: no such folder: ./typo (the model's local path; a hub id reads org/name)" \
            or ("no such folder: ./typo" in err and err.count("\n") == 1), (argv, err)


def test_eval_out_that_is_a_folder_or_under_a_file_gets_one_line(tmp_path, capsys) -> None:
    (tmp_path / "afile").write_text("")
    for out, problem in ((tmp_path, "Is a directory"), (tmp_path / "afile" / "rows.jsonl", "Not a directory")):
        assert main(["eval", "videoqa", "--out", str(out), "--limit", "1", "--frames", "2"]) == 2
        err = capsys.readouterr().err  # progress bars go to stderr too; the message is one whole line
        lines = [line for line in err.splitlines() if line.startswith("mmeff:")]
        assert len(lines) == 1 and lines[0].startswith(f"mmeff: error: {problem} (") and "Traceback" not in err, err
