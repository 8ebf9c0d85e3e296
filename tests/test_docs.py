"""The documentation: its Python blocks run, its pages are in the site, its numbers come from
scripts/docs_numbers.py.

Every ```python block of README.md and docs/ runs, page by page in one namespace (a later
block may use what an earlier one defined), in a temporary folder, unless the line before it
is ``<!-- excerpt -->`` (a piece of a larger program: learn2learn's example, a loop that needs
a dataset). ``mkdocs build --strict`` itself runs in .ci/run and ``make docs``.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
EXCERPT = "<!-- excerpt -->"


def _load_script():
    spec = importlib.util.spec_from_file_location("docs_numbers", REPO / "scripts/docs_numbers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


docs_numbers = _load_script()
PAGES = docs_numbers.pages()


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, is an excerpt) of every ```python block of ``text``."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```$", text, re.M | re.S):
        line = text.count("\n", 0, match.start()) + 1
        previous = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        blocks.append((line, match[1], previous.strip() == EXCERPT))
    return blocks


RUNNABLE = [page for page in PAGES if any(not e for _, _, e in python_blocks(page.read_text()))]


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(REPO)) for p in RUNNABLE])
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for line, code, excerpt in python_blocks(page.read_text()):
        if excerpt:
            continue
        name = f"{page.relative_to(REPO)}:{line}"
        exec(compile(code, name, "exec"), namespace)  # noqa: S102 - the page's own example


def test_excerpt_markers_stand_before_python_blocks() -> None:
    """An excerpt marker stands right before a ```python fence, nowhere else."""
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(re.escape(EXCERPT), text):
            after = text[match.end() :].lstrip("\n")
            assert after.startswith("```python\n"), f"{page}: {EXCERPT} not before a python block"


def _nav_files(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in _nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in _nav_files(value)]
    return []


def test_every_page_is_in_the_site_navigation() -> None:
    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    listed = set(_nav_files(config["nav"]))
    on_disk = {str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md")}
    assert listed <= on_disk, f"nav names missing pages: {sorted(listed - on_disk)}"
    assert on_disk <= listed, f"not in nav: {sorted(on_disk - listed)}"


def test_readme_is_a_front_door() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for command in ("bash scripts/install.sh", "bash scripts/check.sh", "quickstart"):
        assert command in text
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (REPO / link).exists(), f"README links to missing {link}"


QUICKSTART_OUTPUT = """\
ε = 16 pixel levels (16/255), for training and the table: the smallest of 2, 4, 8, 16, 32 at which FGSM brings MAML's Clean-Adversarial accuracy below 90% of its Clean-Clean on its final meta-validation (76.4 vs 98.0 % on 10 seeded tasks of the meta-training digits).
Digits 16x16, 5-way 5-shot, 60 meta-iterations, 40 seeded test tasks (digits 5-9), FGSM, paper protocol; accuracy (%) ± 95% CI:
| Method | Support | Clean query | Adversarial query (ε = 16/255) |
| --- | --- | --- | --- |
| MAML | Clean | 83.60 ± 2.27 | 27.20 ± 3.35 |
| MAML-AD | Clean | 84.20 ± 2.33 | 57.00 ± 3.11 |
| ADML | Clean | 84.80 ± 2.15 | 63.20 ± 2.96 |

Clean-Adversarial at ε = 2, 4, 8, 16, 32: MAML 75.1 66.7 48.1 27.2 15.5
quickstart finished in 509 s (218 s CPU, 1 torch thread); results in runs/quickstart
"""

COUNTS_OUTPUT = """\
......
device cpu (x86_64, 2 cores), torch 2.14.1+cu130, 2 intra-op threads, allocator: default

[counts] 5-way 1-shot, 15 queries/class, 1x16x16, CNN4 hidden 4, 5 inner steps, meta-batch 4, second-order
benchmark                                             median s     min s rounds  x MAML  (min)   GFLOP   (x)  +RSS MB  CUDA MB  images/s     ops   (x)  launch   (x) syncs
maml (learn2learn reference)                           15.2019   15.2019      1    1.00   1.00     0.1  1.00       53        -         -   15232  1.00   12506  1.00    18
adml (meta_step, vmap, not folded)                      9.0660    9.0660      1    0.60   0.60     0.2  2.43       49        -         -    6228  0.41    3576  0.29    19

paired rounds: the functions alternate round by round (rotating order); x first = ...
[counts] 5-way 1-shot, 15 queries/class, 1x16x16, CNN4 hidden 4, 5 inner steps, meta-batch 4, second-order
benchmark                                             median s  x first    min    max rounds
maml (learn2learn reference)                            0.6498     1.00   1.00   1.00      1
adml (meta_step, sequential)                            1.8164     2.80   2.80   2.80      1

"""


def test_quickstart_block_quotes_the_output_and_compares_the_rows() -> None:
    block = docs_numbers.quickstart_block(QUICKSTART_OUTPUT, "ORIGIN")
    assert block.startswith("ORIGIN:\n\n```text\nε = 16 pixel levels")
    assert "| ADML | Clean | 84.80 ± 2.15 | 63.20 ± 2.96 |" in block
    # 63.20 - 27.20 = 36.0 > 2.96 + 3.35; 63.20 - 57.00 = 6.2 > 2.96 + 3.11 = 6.07
    assert "+36.0 points against MAML (more than the sum of the two 95 % intervals, 6.31)" in block
    assert (
        "+6.2 points against MAML-AD (more than the sum of the two 95 % intervals, 6.07)" in block
    )


def test_benchmark_blocks_keep_the_chosen_columns() -> None:
    block = docs_numbers.benchmark_block(
        COUNTS_OUTPUT, "ORIGIN", "counts", docs_numbers.COUNTS_COLUMNS
    )
    assert block.startswith("ORIGIN (`[counts] 5-way 1-shot")
    assert "| one meta-iteration | ATen ops | x l2l | launches | x l2l | syncs |" in block
    assert "| maml (learn2learn reference) | 15232 | 1.00 | 12506 | 1.00 | 18 |" in block
    assert "| adml (meta_step, vmap, not folded) | 6228 | 0.41 | 3576 | 0.29 | 19 |" in block
    assert "paired" not in block and "15.2019" not in block and "1.8164" not in block
    times = docs_numbers.benchmark_block(
        COUNTS_OUTPUT, "ORIGIN", "counts", docs_numbers.SMALL_COLUMNS
    )
    assert "| maml (learn2learn reference) | 15.2019 | 15.2019 | 1.00 | 1.00 | 1.00 | 53 |" in times
    assert "paired" not in times
    paired = docs_numbers.benchmark_block(
        COUNTS_OUTPUT, "ORIGIN", "counts", docs_numbers.SMALL_COLUMNS, paired=True
    )
    assert paired.startswith(times)
    assert "| adml (meta_step, sequential) | 1.8164 | 2.80 | 2.80 | 2.80 | 1 |" in paired
    with pytest.raises(SystemExit, match=r"no \[small\] table"):
        docs_numbers.benchmark_block(COUNTS_OUTPUT, "ORIGIN", "small", docs_numbers.SMALL_COLUMNS)


def test_blocks_replace_only_their_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "a\n<!-- docs-numbers:counts begin -->\nold\n<!-- docs-numbers:counts end -->\n"
        "<!-- docs-numbers:gpu begin -->\nkept\n<!-- docs-numbers:gpu end -->\n"
    )
    assert docs_numbers.write_blocks({"counts": "new\n"}, [page]) == [page]
    assert page.read_text() == (
        "a\n<!-- docs-numbers:counts begin -->\nnew\n<!-- docs-numbers:counts end -->\n"
        "<!-- docs-numbers:gpu begin -->\nkept\n<!-- docs-numbers:gpu end -->\n"
    )
    assert docs_numbers.write_blocks({"counts": "new\n"}, [page]) == []  # idempotent
    with pytest.raises(SystemExit, match="quickstart"):
        docs_numbers.write_blocks({"quickstart": "x"}, [page])


def test_the_pages_hold_generated_numbers() -> None:
    """Every marker holds what the script wrote: a commit and a date, or 'Unmeasured'."""
    names: dict[str, int] = {}
    for page in PAGES:
        for match in docs_numbers.MARKER.finditer(page.read_text()):
            names[match["name"]] = names.get(match["name"], 0) + 1
            body = match["body"]
            assert "Generated by `python scripts/docs_numbers.py` on" in body or (
                match["name"] == "gpu" and ("Unmeasured" in body or "make gpu-check" in body)
            ), f"{page}: marker {match['name']} is empty or hand-written"
    assert names == {"quickstart": 2, "counts": 1, "small": 1, "gpu": 1}
