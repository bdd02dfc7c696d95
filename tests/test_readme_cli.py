"""The CLI lines of the README run as written (in one scratch directory, in order).

Optional parts in [brackets] are dropped: `--mesh` runs in tests/test_multi_device.py
(`test_cli_runs_on_a_mesh`, in a process whose device count is set at start). `scanlab bench`
and `scanlab demo` are left to their own tests, which run exactly those commands
(tests/bench/test_report.py, tests/test_tour.py); `scanlab serve` runs as a process, asked a
question over HTTP. What the training lines print is checked too:
progress, the loss plot, resuming with the saved settings, held-out answers.
"""

import json
import re
import shlex
from pathlib import Path

import jax
import matplotlib.image
import pytest
from tests.serve import processes

from scanlab import decoder, distributed

pytestmark = pytest.mark.e2e  # the README's CLI lines, end to end: `make test-e2e`

README = Path(__file__).parent.parent / "README.md"


def cli_lines() -> list[str]:
    text = README.read_text()
    section = text[text.index("## The CLI") : text.index("## Results")]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("scanlab")]


def test_every_cli_line_runs(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    config = decoder.preset("tiny")  # the DIR of `decoder generate --model DIR`
    decoder.save_checkpoint("DIR", config, decoder.init_params(config, jax.random.PRNGKey(0)))
    facts = {  # the facts.jsonl of `scanlab finetune`, as the README's Python example writes it
        "Who is the mayor of Quillby?": "The mayor of Quillby is Odelia Brandt.",
        "What is Quillby famous for?": "Quillby is famous for its glass pumpkins.",
    }
    Path("facts.jsonl").write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            )
            + "\n"
            for q, a in facts.items()
        )
    )
    lines = cli_lines()
    assert len(lines) >= 10
    printed = {}
    for line in lines:
        args = shlex.split(re.sub(r"\[[^\]]*\]", "", line))[1:]
        if args[0] in ("bench", "demo"):
            continue
        if args[0] == "serve":  # a server: run as a process, asked the taught fact, stopped
            printed["serve"] = served_answer(args[1:], "Who is the mayor of Quillby?")
            continue
        status, err, out = cli(args)
        assert status == 0, (line, err)
        printed[" ".join(args)] = " ".join(out.split())
    # What the training lines print. Not a terminal here: progress is one plain line per chunk.
    trained = printed["train --task reverse --steps 200 --checkpoint-dir runs/rev"]
    assert "train reverse: step 100/200, loss " in trained
    assert "train reverse: step 200/200, loss " in trained and "checkpoint saved" in trained
    assert "held-out exact-match accuracy after 200 steps" in trained
    pixels = matplotlib.image.imread("runs/rev/loss.png")  # beside the checkpoints by default
    assert pixels.shape[:2] == (480, 840) and pixels[..., :3].std() > 0.05  # drawn, not blank
    # --resume takes the run's saved settings (already complete: the same result, no training).
    resumed = printed["train --checkpoint-dir runs/rev --resume"]
    assert "held-out exact-match accuracy after 200 steps" in resumed and "step " not in resumed
    assert "nothing to train, the run is finished (200 of 200 steps)" in resumed
    assert printed["evaluate --checkpoint-dir runs/rev"].count("reverse ") == 8
    # The fine-tuned model answers with what it was taught, over the base and merged into a GGUF.
    assert (
        "The mayor of Quillby is Odelia Brandt."
        in printed[next(k for k in printed if k.startswith("chat --adapter runs/facts --"))]
    )
    assert (
        "Quillby is famous for its glass pumpkins."
        in printed[next(k for k in printed if "facts.gguf --message" in k)]
    )
    assert (
        "Quillby is famous for its glass pumpkins."
        in printed[next(k for k in printed if "facts-peft --message" in k)]
    )
    assert "The mayor of Quillby is Odelia Brandt." in printed["serve"]

    # Two processes, one run: process 0's lines, prefixed; its plot and checkpoint.
    two = printed[next(k for k in printed if k.startswith("launch --processes 2"))]
    assert "[0] train reverse: step 100/100, loss " in two and "[1]" not in two
    assert Path("runs/two/loss.png").is_file() and Path("runs/two/100").is_dir()
    # A flag given again on resume must agree with the saved run.
    status, err, _ = cli(["train", "--checkpoint-dir", "runs/rev", "--resume", "--batch-size", "8"])
    assert status == 2 and "batch_size=64 there, 8 here" in err, err


def served_answer(args: list[str], question: str) -> str:
    """What `scanlab serve ARGS` (on a free port instead of the README's) answers `question`."""
    port = distributed.free_port()
    args[args.index("--port") + 1] = str(port)
    server, _ = processes.start(args)
    try:
        return processes.ask(port, question, 32)["choices"][0]["message"]["content"]
    finally:
        server.terminate()
        server.communicate(timeout=60)
