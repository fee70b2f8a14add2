"""Models, data and helpers shared by the tests."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

import sparselearn as sl
from sparselearn.kernels import extension
from sparselearn.structure import parse_structure

# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, d_in: int = 20, hidden: int = 32, d_out: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvBN(nn.Module):
    """A small convolutional net with BatchNorm, for (B, 1, 8, 8) inputs."""

    def __init__(self, d_out: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(16 * 4 * 4, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class TiedLM(nn.Module):
    """Embedding and output projection share one weight (weight tying)."""

    def __init__(self, vocab: int = 30, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.embed(tokens))))


class RNNClassifier(nn.Module):
    def __init__(self, cell: str = "lstm", d_in: int = 6, hidden: int = 12, d_out: int = 5):
        super().__init__()
        rnn_type = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn_type(d_in, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def masked(dense: nn.Module, density: float = 0.3) -> nn.Module:
    """``dense`` with a random share ``density`` of its weight kept, the rest exact zeros."""
    w = dense.weight
    assert isinstance(w, torch.Tensor)
    with torch.no_grad():
        w.mul_(torch.rand(w.shape) < density)
    return dense


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP,
    "conv_bn": ConvBN,
    "tied": TiedLM,
    "lstm": lambda: RNNClassifier("lstm"),
    "gru": lambda: RNNClassifier("gru"),
}
RNN_INCLUDE = ["re:rnn\\.weight_(ih|hh)_l\\d+"]


def make_batch(kind: str, n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(n, 20, generator=g), torch.randint(0, 5, (n,), generator=g)
    if kind == "conv_bn":
        return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)
    if kind == "tied":
        tokens = torch.randint(0, 30, (n,), generator=g)
        return tokens, torch.roll(tokens, 1)
    return torch.randn(n, 7, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def batches(kind: str, steps: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(steps):
        yield make_batch(kind, seed=seed * 100_003 + i)


def model_options(kind: str) -> dict[str, Any]:
    """Options that make each test model sparsify its interesting tensors."""
    if kind in ("lstm", "gru"):
        return {"include": RNN_INCLUDE}
    if kind == "tied":
        return {"include": [nn.Embedding]}
    return {}


def method_options(method: str, total_steps: int, update_every: int = 3) -> dict[str, Any]:
    """Short schedules so that mask updates happen inside short test runs."""
    defaults = sl.METHODS.get(method).defaults
    schedule = defaults["schedule"]
    opts: dict[str, Any] = {"total_steps": total_steps}
    if schedule != "dense":
        # an N:M preset fixes the density at N/M
        opts["density"] = parse_structure(defaults.get("structure", "unstructured")).density or 0.2
    if schedule in ("periodic", "gradual"):
        opts["update_every"] = update_every
    return opts


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Any, y: Any) -> None:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def save_load(obj: Any) -> Any:
    """Round-trip through torch.save / torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_inactive_zero(engine: sl.SparseEngine, model: nn.Module) -> None:
    params = dict(model.named_parameters())
    for name, mask in engine.masks.items():
        assert mask.dtype == torch.bool
        assert mask.shape == params[name].shape
        assert torch.count_nonzero(params[name].detach()[~mask]) == 0, name


# ----------------------------------------------------------------------------- kernels


class BoundKernels:
    """The kernel operators (``sparselearn.kernels.ops``) with their last argument, ``kernels``,
    bound: ``BoundKernels(x, "cpp").pack(x)`` is ``ops.pack(x, kernels_for(x, "cpp"))``."""

    def __init__(self, t: torch.Tensor, backend: str = "auto", threads: int | None = None) -> None:
        from sparselearn.kernels import kernels_for

        self.kernels = kernels_for(t, backend, threads)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        from sparselearn.kernels import ops

        op = getattr(ops, name)
        return lambda *args: op(*args, self.kernels)


def sparse_mlp(
    method: str = "sparse_momentum", optimizer: str = "sgd", **options: object
) -> tuple[MLP, torch.optim.Optimizer, sl.SparseEngine]:
    """A small MLP sparsified at density 0.2 for 100 steps (seed 0), with its optimizer: SGD
    with momentum, ``"adam"``, or plain SGD (any other name)."""
    torch.manual_seed(0)
    model = MLP()
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kw: dict[str, Any] = {"density": 0.2, "total_steps": 100, "seed": 0}
    kw.update(options)
    return model, opt, sl.sparsify(model, opt, method=method, **kw)


def distinct_values(shape: torch.Size, seed: int) -> torch.Tensor:
    """Values without ties, so that a top-k is unambiguous."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    return (torch.randperm(n, generator=g).float() + 1).reshape(shape) / n


# ----------------------------------------------------------------------------- sparse layers

# the kernel implementations this machine has: PyTorch's always, the compiled ones where built
BACKENDS = ["torch"] + (["cpp"] if extension() is not None else [])


def masked_linear(
    n_in: int, n_out: int, density: float, dtype: torch.dtype
) -> tuple[nn.Linear, torch.Tensor]:
    lin = nn.Linear(n_in, n_out).to(dtype)
    mask = torch.rand(n_out, n_in) < density
    with torch.no_grad():
        lin.weight.mul_(mask)
    return lin, mask


def masked_conv(
    c_in: int,
    c_out: int,
    k: int,
    stride: int,
    pad: int | tuple[int, int],
    density: float,
    dtype: torch.dtype,
) -> tuple[nn.Conv2d, torch.Tensor]:
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad).to(dtype)
    mask = torch.rand(conv.weight.shape) < density
    with torch.no_grad():
        conv.weight.mul_(mask)
    return conv, mask
