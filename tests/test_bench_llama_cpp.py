"""bench/llama_cpp.py without llama.cpp: the timing-log parser on a real llama-mtmd-cli log, the refusal of a tree
that lacks a built binary, where the peers sit among the configurations, and the report's llama.cpp table.
(The conversion and the runs themselves need a built llama.cpp: bench/README.md, "llama.cpp as a peer".)"""

import os
from pathlib import Path

import pytest

from bench import bench, llama_cpp
from qwen2vl.errors import InvalidInputError

# The end of a real llama-mtmd-cli log (llama-cpp-python 0.3.36's tree, -lv 4, the nano demo model in bf16, one
# 448x448 image; the line naming the model file left out), timestamps as the CLI prints them.
LOG = (Path(__file__).resolve().parent / "data" / "llama-mtmd-cli-nano.log").read_text()


def test_parse_log_reads_a_real_llama_mtmd_cli_log():
    got = llama_cpp.parse_log(LOG)
    assert got == {"load_ms": 17319.23, "prompt_eval_ms": 28190.57, "prompt_tokens": 281, "eval_ms": 1860.92,
                   "eval_runs": 31, "image_encode_ms": 13022.0, "image_batch_ms": 1495.0}
    # prompt eval holds the image encode and the image's batch
    assert got["prompt_eval_ms"] > got["image_encode_ms"] + got["image_batch_ms"]


def test_parse_log_names_what_is_missing():
    with pytest.raises(ValueError, match="lacks load_ms, prompt_eval_ms, eval_ms"):
        llama_cpp.parse_log("main: loading model: x.gguf\nencoding image slice...\n")
    no_eval = "\n".join(x for x in LOG.splitlines() if " eval time =" not in x or "prompt eval" in x)
    with pytest.raises(ValueError, match="lacks eval_ms "):
        llama_cpp.parse_log(no_eval)


def _tool(path: Path, executable: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755 if executable else 0o644)


def test_find_tree_names_every_missing_piece(tmp_path):
    with pytest.raises(InvalidInputError, match="not a directory"):
        llama_cpp.find_tree(tmp_path / "nowhere")
    _tool(tmp_path / "build" / "bin" / "llama-quantize", executable=False)  # present but not runnable
    with pytest.raises(InvalidInputError) as e:
        llama_cpp.find_tree(tmp_path)
    msg = str(e.value)
    for piece in ("llama-mtmd-cli (looked in", "llama-quantize (looked in", "convert_hf_to_gguf.py", "gguf-py",
                  "cmake --build build --target llama-mtmd-cli llama-quantize"):
        assert piece in msg, msg
    _tool(tmp_path / "build" / "bin" / "llama-mtmd-cli")
    _tool(tmp_path / "bin" / "llama-quantize")
    _tool(tmp_path / "convert_hf_to_gguf.py")
    (tmp_path / "gguf-py").mkdir()
    t = llama_cpp.find_tree(tmp_path, "py")
    assert (t.mtmd_cli, t.quantize, t.python) == (tmp_path / "build" / "bin" / "llama-mtmd-cli",
                                                  tmp_path / "bin" / "llama-quantize", "py")


def test_bench_refuses_a_tree_without_binaries_before_doing_anything(tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.main(["--llama-cpp", str(tmp_path), "--model", str(tmp_path / "never-written"), "--quick"])
    assert str(e.value).startswith(f"--llama-cpp {tmp_path}: missing llama-mtmd-cli")
    assert not (tmp_path / "never-written").exists()


def test_peers_follow_their_qwen2vl_configuration(tmp_path):
    names = [c["name"] for c in bench.configurations(bench.parse_args(["--llama-cpp", str(tmp_path)]))]
    at = names.index("qwen2vl-bfloat16")
    assert names[at:at + 2] == ["qwen2vl-bfloat16", "llamacpp-bf16"]
    at = names.index("qwen2vl-int8")
    assert names[at:at + 5] == ["qwen2vl-int8", "llamacpp-q8_0", "qwen2vl-int4", "llamacpp-q4_0", "llamacpp-q4_k_m"]
    assert not any(n.startswith("llamacpp") for n in (c["name"] for c in bench.configurations(bench.parse_args([]))))
    # a full name selects that configuration only (not its -compiled sibling); a prefix selects all it starts
    picked = bench.configurations(bench.parse_args(["--llama-cpp", str(tmp_path), "--only", "qwen2vl-int8,llamacpp"]))
    assert [c["name"] for c in picked] == ["llamacpp-bf16", "qwen2vl-int8", "llamacpp-q8_0", "llamacpp-q4_0",
                                           "llamacpp-q4_k_m"]
    assert picked[2]["peer"] == "qwen2vl-int8" and picked[2]["llama_cpp"] == str(tmp_path)


def _qwen(name, fmt, **kw):
    return dict({"name": name, "cfg": {"kind": "engine", "engine": "qwen2vl", "dtype": "bfloat16", "format": fmt},
                 "ttft_s": 2.0, "decode_tok_s": 4.0, "peak_rss_load": 1.0e9, "peak_rss_serve": 2.0e9,
                 "load_s": 1.0, "weights_bytes": 1.5e9, "prompt_tokens": 281}, **kw)


def _peer(fmt, peer, **kw):
    return dict({"name": f"llamacpp-{fmt}", "cfg": {"kind": "llamacpp", "engine": "llama.cpp", "format": fmt,
                                                     "peer": peer},
                 "ttft_s": 3.0, "decode_tok_s": 2.0, "peak_rss": 3.0e9, "load_s": 1.5, "weights_bytes": 1.6e9,
                 "prompt_tokens": 281, "ttft_runs_s": [3.0, 3.1, 2.9], "image_encode_s": 1.25, "threads": 2,
                 "version": "version: 1 (abc)"}, **kw)


def test_report_table_pairs_each_peer_with_its_qwen2vl_row(tmp_path):
    results = [_qwen("qwen2vl-bfloat16", "bfloat16"), _peer("bf16", "qwen2vl-bfloat16"),
               _qwen("qwen2vl-int4", "int4", ttft_s=1.5), _peer("q4_0", "qwen2vl-int4", error="RuntimeError: boom"),
               _peer("q4_k_m", "qwen2vl-int4", ttft_s=1.5, decode_tok_s=8.0)]
    lines = llama_cpp.report_lines(results)
    rows = [x for x in lines if x.startswith("| ") and not x.startswith("| configuration")]
    assert [r.split(" | ")[0] for r in rows] == ["| qwen2vl-bfloat16", "| llamacpp-bf16", "| qwen2vl-int4",
                                                 "| llamacpp-q4_0", "| llamacpp-q4_k_m"]
    assert rows[0].startswith("| qwen2vl-bfloat16 | bfloat16 | 2.00 | 4.00 | 2.00 | 1.0 | 1.50 | – |")
    # TTFT 3/2, decode 4/2, peak 3/2 (qwen2vl: the larger of load and serving), load 1.5/1
    assert rows[1].startswith("| llamacpp-bf16 | BF16 | 3.00 | 2.00 | 3.00 | 1.5 | 1.60 | "
                              "1.50× / 2.00× / 1.50× / 1.50× |")
    assert "image encode 1.25 s of the TTFT" in rows[1] and "TTFT runs 3.00 / 3.10 / 2.90 s" in rows[1]
    assert "| – | **failed**: RuntimeError: boom" in rows[3]
    assert "| 1.00× / 0.50× / 1.50× / 1.50× |" in rows[4]
    assert "version: 1 (abc)" in lines[1] and "2 threads" in lines[1]
    assert llama_cpp.report_lines([_qwen("qwen2vl-bfloat16", "bfloat16")]) == []
    report = bench.build_report(results, {"date": "today", "cpu": "cpu", "cores": 2, "memory": "1 GiB", "torch": "2",
                                          "transformers": "5", "python": "3", "loadavg": "0"},
                                bench.parse_args(["--quick"]), tmp_path, tmp_path)
    assert "## llama.cpp" in report and rows[1] in report


def test_mtmd_command_is_greedy_with_the_checkpoints_template(tmp_path):
    tree = llama_cpp.Tree(tmp_path, tmp_path / "cli", tmp_path / "q", tmp_path / "c.py", "py")
    cmd = llama_cpp.mtmd_command(tree, Path("t.gguf"), Path("m.gguf"), Path("i.png"), "Describe this image.", 32,
                                 os.cpu_count() or 1, 8192)
    flags = {k: cmd[cmd.index(k) + 1] for k in ("-m", "--mmproj", "--image", "-n", "--temp", "-c")}
    assert cmd[0] == str(tmp_path / "cli") and "--ignore-eos" in cmd and "--jinja" in cmd
    assert cmd[cmd.index("-lv") + 1] == "4"  # libllama's timings are the CLI's "trace" level
    assert (flags["-m"], flags["--mmproj"], flags["--image"], flags["-n"], flags["--temp"], flags["-c"]) == (
        "t.gguf", "m.gguf", "i.png", "32", "0", "8192")


# ---- the process handling and the conversion cache, with stand-in tools (shell / Python scripts) for llama.cpp's
FAKE_CLI = """#!/bin/sh
case "$*" in *--version*) echo "version: 0 (stand-in)"; exit 0;; esac
cat <<'END'
%s
END
"""


def _fake_tree(tmp_path: Path, cli_body: str | None = None) -> llama_cpp.Tree:
    import sys

    _tool(tmp_path / "build" / "bin" / "llama-mtmd-cli")
    (tmp_path / "build" / "bin" / "llama-mtmd-cli").write_text(cli_body or FAKE_CLI % LOG)
    _tool(tmp_path / "build" / "bin" / "llama-quantize")  # IN OUT TYPE THREADS: OUT = IN's text + TYPE
    (tmp_path / "build" / "bin" / "llama-quantize").write_text('#!/bin/sh\n{ cat "$1"; echo "$3"; } > "$2"\n')
    (tmp_path / "gguf-py").mkdir(exist_ok=True)
    (tmp_path / "convert_hf_to_gguf.py").write_text(
        "import sys, os\nargs = sys.argv[1:]\nout = args[args.index('--outfile') + 1]\n"
        "assert os.path.basename(out).startswith('partial-'), out\n"
        "assert os.environ['PYTHONPATH'].split(os.pathsep)[0].endswith('gguf-py')\n"
        "open(out, 'w').write(' '.join(a for a in args if a.startswith('--') or a in ('bf16', 'f16')) + '\\n')\n")
    return llama_cpp.find_tree(tmp_path, sys.executable)


def test_run_mtmd_reads_the_log_rss_and_exit_of_one_process(tmp_path):
    tree = _fake_tree(tmp_path / "tree")
    got = llama_cpp.run_mtmd([str(tree.mtmd_cli), "-m", "x"], tmp_path / "run.log", timeout=60)
    assert got["prompt_eval_ms"] == 28190.57 and got["eval_runs"] == 31
    assert 0 < got["wall_s"] < 60 and got["peak_rss"] > 100_000  # ru_maxrss of the shell, in bytes
    bad = tmp_path / "bad"
    bad.write_text("#!/bin/sh\necho 'clip: cannot load mmproj'\nexit 3\n")
    bad.chmod(0o755)
    with pytest.raises(RuntimeError, match="exit code 3 .*clip: cannot load mmproj"):
        llama_cpp.run_mtmd([str(bad)], tmp_path / "bad.log", timeout=60)
    slow = tmp_path / "slow"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    with pytest.raises(RuntimeError, match="ran past 1 s"):
        llama_cpp.run_mtmd([str(slow)], tmp_path / "slow.log", timeout=1)


def test_ensure_gguf_converts_once_quantizes_from_bf16_and_keeps_no_partial_file(tmp_path):
    tree = _fake_tree(tmp_path / "tree")
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text("{}")
    said = []
    text, mmproj = llama_cpp.ensure_gguf(tree, model, "q4_k_m", cache=tmp_path / "gguf", say=said.append)
    assert (text.name, mmproj.name) == ("text-q4_k_m.gguf", "mmproj-f16.gguf")
    assert mmproj.read_text() == "--outfile --mmproj --outtype f16\n"
    assert text.read_text() == "--outfile --outtype bf16\nQ4_K_M\n"  # quantized from the bf16 GGUF
    assert not list((tmp_path / "gguf").rglob("partial-*"))
    n = len(said)
    assert llama_cpp.ensure_gguf(tree, model, "q4_k_m", cache=tmp_path / "gguf", say=said.append) == (text, mmproj)
    assert len(said) == n  # nothing written again
    (model / "config.json").write_text('{"changed": 1}')  # another checkpoint state: another directory
    assert llama_cpp.ensure_gguf(tree, model, "bf16", cache=tmp_path / "gguf", say=said.append)[0].parent != text.parent
    (tree.convert).write_text("import sys; print('Can not map tensor x'); sys.exit(1)\n")
    with pytest.raises(RuntimeError, match=r"writing mmproj-f16.gguf failed \(exit code 1; .*Can not map tensor x"):
        llama_cpp.ensure_gguf(tree, model, "bf16", cache=tmp_path / "gguf2", say=said.append)
    with pytest.raises(InvalidInputError, match="llama.cpp format 'q2_k'"):
        llama_cpp.ensure_gguf(tree, model, "q2_k", cache=tmp_path / "gguf", say=said.append)


def test_worker_runs_warm_up_then_one_process_per_image(tmp_path):
    from bench.common import Result

    tree = _fake_tree(tmp_path / "tree")
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text("{}")
    spec = {"name": "llamacpp-q8_0", "format": "q8_0", "llama_cpp": str(tree.root), "llama_cpp_python": tree.python,
            "model": str(model), "artifacts": str(tmp_path), "decode_tokens": 32, "ttft_runs": 3}
    res = Result(tmp_path / "r.json")
    llama_cpp.worker(dict(spec, gguf_cache=str(tmp_path / "gguf")), res)
    assert res["ttft_s"] == pytest.approx(28.19057) and res["decode_tok_s"] == pytest.approx(31 / 1.86092)
    assert res["prompt_tokens"] == 281 and res["decode_tokens"] == 31 and res["image_encode_s"] == 13.022
    assert len(res["runs"]) == 3 and res["version"] == "version: 0 (stand-in)"
    loads = sorted(r["wall_s"] - 30.05149 for r in res["runs"])  # each process's wall time less prompt and eval
    assert res["load_s"] == pytest.approx(loads[1]) and res["peak_rss"] == max(r["peak_rss"] for r in res["runs"])
    assert sorted(p.name for p in tmp_path.glob("llamacpp-q8_0.*.png")) == [
        "llamacpp-q8_0.0.png", "llamacpp-q8_0.1.png", "llamacpp-q8_0.2.png", "llamacpp-q8_0.warmup.png"]
