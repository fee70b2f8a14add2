"""Every Python example in the README and the docs pages runs as written, and the README stays a
front page whose links lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import sparselearn as sl
from tests.helpers import MLP, batches

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
BLOCKS = [
    (page.relative_to(REPO).as_posix(), block)
    for page in PAGES
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
]


# what a block may assume, when its first line says "# with your model, optimizer, ..."
CONTEXT = re.compile(r"^# with your ([a-z_, ]+)\n")


def context() -> dict[str, Any]:
    torch.manual_seed(0)
    model = MLP()
    return {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        "train_loader": list(batches("mlp", 6)),
        "loss_fn": nn.functional.cross_entropy,
        "epochs": 2,
    }


def namespace(block: str) -> dict[str, Any]:
    """A clean namespace, with only the names the block says it assumes: whatever else it uses
    (torch included) it must import itself."""
    ns: dict[str, Any] = {"__name__": "readme"}
    declared = CONTEXT.match(block)
    if declared:
        names = [n.strip() for n in re.split(r",| and ", declared.group(1)) if n.strip()]
        given = context()
        unknown = sorted(set(names) - set(given))
        assert not unknown, f"the README block assumes {unknown}, which the test cannot give"
        ns.update({n: given[n] for n in names})
    return ns


def test_the_readme_has_examples() -> None:
    assert sum(page == "README.md" for page, _ in BLOCKS) >= 2
    assert len(BLOCKS) >= 8


def test_the_readme_is_a_front_page_whose_links_resolve() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


@pytest.mark.parametrize(
    "index", range(len(BLOCKS)), ids=[f"{page}-{i}" for i, (page, _) in enumerate(BLOCKS)]
)
def test_readme_example_runs(
    index: int,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # examples that write runs/ write them here
    registries: list[sl.Registry[Any]] = [
        sl.GROWTH,
        sl.PRUNE,
        sl.REDISTRIBUTION,
        sl.MASK_SCHEDULE,
        sl.METHODS,
    ]
    before = [set(r.names()) for r in registries]
    page, block = BLOCKS[index]
    ns = namespace(block)
    try:
        exec(compile(block, f"{page} block {index}", "exec"), ns)
    finally:
        for registry, names in zip(registries, before, strict=True):
            for name in set(registry.names()) - names:
                registry.unregister(name)
    engine = ns.get("engine") or getattr(ns.get("mask"), "engine", None)
    assert isinstance(engine, sl.SparseEngine)
    params = dict(engine.model.named_parameters())
    for layer in engine.layers:
        if layer.kind == "csr":  # accelerated: it holds its active values only
            assert layer.name not in params
            assert int(torch.count_nonzero(layer.mask)) == layer.param.numel() == layer.active
            continue
        weight = params[layer.name]
        assert torch.count_nonzero(weight.detach()[~layer.mask]) == 0
