"""Datasets: formats, lookup order, downloads, splits, batches, augmentation."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sparselearn.data import datasets as ds
from sparselearn.data.cifar import read_batch
from sparselearn.data.download import DownloadError, download_file, extract_tar
from tests.datafiles import IDX_NAMES, write_cifar, write_image_folders, write_mnist_like


@pytest.fixture(autouse=True)
def no_environment_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPARSELEARN_DATA", raising=False)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server serving ``tmp_path / 'www'``."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_datasets_load_with_a_fixed_validation_split(tmp_path: Path, name: str) -> None:
    write_mnist_like(tmp_path / name, n_train=500, n_test=100)
    data = ds.load_dataset(name, tmp_path, val_fraction=0.1, download=False)
    assert (data.size("train"), data.size("val"), data.size("test")) == (450, 50, 100)
    assert data.info.input_shape == (1, 28, 28)
    again = ds.load_dataset(name, tmp_path, val_fraction=0.1, download=False)
    xa, ya = next(again.batches("val", 50, shuffle=False, seed=0, epoch=0, augment=False))
    xb, yb = next(data.batches("val", 50, shuffle=False, seed=9, epoch=3, augment=False))
    assert torch.equal(xa, xb)
    assert torch.equal(ya, yb)
    other = ds.load_dataset(name, tmp_path, val_fraction=0.1, split_seed=1, download=False)
    _, yc = next(other.batches("val", 50, shuffle=False, seed=0, epoch=0, augment=False))
    assert not torch.equal(ya, yc)


def test_batches_are_normalised_and_deterministic_under_a_seed(tmp_path: Path) -> None:
    write_mnist_like(tmp_path, n_train=300)
    data = ds.load_dataset("mnist", tmp_path, download=False)

    def epoch(seed: int, e: int) -> list[torch.Tensor]:
        return [
            y for _, y in data.batches("train", 64, shuffle=True, seed=seed, epoch=e, augment=False)
        ]

    assert all(torch.equal(a, b) for a, b in zip(epoch(1, 0), epoch(1, 0), strict=True))
    assert not torch.equal(torch.cat(epoch(1, 0)), torch.cat(epoch(1, 1)))
    assert not torch.equal(torch.cat(epoch(1, 0)), torch.cat(epoch(2, 0)))
    assert sorted(torch.cat(epoch(1, 0)).tolist()) == sorted(torch.cat(epoch(2, 5)).tolist())
    x = torch.cat(
        [x for x, _ in data.batches("train", 64, shuffle=False, seed=0, epoch=0, augment=False)]
    )
    raw = data.splits["train"][0].float() / 255  # type: ignore[attr-defined]
    assert torch.allclose(x, (raw - 0.1307) / 0.3081)


def test_cifar10_batches(tmp_path: Path) -> None:
    write_cifar(tmp_path, per_batch=40)
    data = ds.load_dataset("cifar10", tmp_path, val_fraction=0.1, download=False)
    assert (data.size("train"), data.size("val"), data.size("test")) == (180, 20, 40)
    x, y = next(data.batches("train", 16, shuffle=True, seed=0, epoch=0, augment=True))
    assert x.shape == (16, 3, 32, 32)
    assert y.shape == (16,)
    assert data.info.augment


def test_cifar_reader_refuses_arbitrary_objects(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("echo pwned",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": [1]}))
    with pytest.raises(pickle.UnpicklingError, match=r"must not reference (posix|os)\.system"):
        read_batch(path)


def test_pad_crop_flip_takes_windows_of_the_padded_image() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1
    out = ds.pad_crop_flip(x, g, pad=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        found = False
        for dy in range(5):
            for dx in range(5):
                window = padded[b, :, dy : dy + 8, dx : dx + 8]
                found |= torch.equal(out[b], window) or torch.equal(out[b], window.flip(-1))
        assert found


def test_lookup_order_data_dir_then_environment_then_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, env, system = (
        write_mnist_like(tmp_path / d, n_train=50 + i * 10, n_test=20)
        for i, d in enumerate(("given", "env", "system"))
    )
    info = replace(ds.DATASETS.get("fashion-mnist"), system_dirs=(str(system),))
    monkeypatch.setitem(ds.DATASETS._items, "fashion-mnist", info)
    assert ds.locate(info, first) == first
    monkeypatch.setenv("SPARSELEARN_DATA", str(env))
    assert ds.locate(info, first) == first
    assert ds.locate(info, None) == env
    monkeypatch.delenv("SPARSELEARN_DATA")
    assert ds.locate(info, None) == system
    nested = tmp_path / "root"
    (nested / "fashion-mnist").mkdir(parents=True)
    for f in system.iterdir():
        (nested / "fashion-mnist" / f.name).write_bytes(f.read_bytes())
    assert ds.locate(info, nested) == nested / "fashion-mnist"  # the dataset's own sub-folder


def test_missing_data_names_every_place_searched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = ds.DATASETS.get("fashion-mnist")
    assert info.system_dirs == ("/usr/share/datasets/fashion-mnist",)  # the Debian package
    system = tmp_path / "system"  # this machine may have the package: search elsewhere
    monkeypatch.setitem(
        ds.DATASETS._items, "fashion-mnist", replace(info, system_dirs=(str(system),))
    )
    monkeypatch.setenv("SPARSELEARN_DATA", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError) as err:
        ds.load_dataset("fashion-mnist", tmp_path / "given", download=False)
    msg = str(err.value)
    for place in (
        tmp_path / "given",
        tmp_path / "env",
        system,
        tmp_path / "given" / "fashion-mnist",
    ):
        assert str(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    with pytest.raises(FileNotFoundError, match="cannot be downloaded automatically"):
        ds.load_dataset("imagenet", tmp_path / "given")


def test_download_from_a_local_server_with_checksums(
    tmp_path: Path, server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, www = server
    write_mnist_like(www, n_train=60, n_test=20)
    info = ds.DATASETS.get("mnist")
    downloads = tuple((u, md5(www / u.rsplit("/", 1)[1])) for u, _ in info.downloads)
    monkeypatch.setitem(ds.DATASETS._items, "mnist", replace(info, downloads=downloads))
    target = tmp_path / "data"
    data = ds.load_dataset("mnist", target, mirror=url)
    assert data.size("test") == 20
    assert sorted(p.name for p in (target / "mnist").iterdir()) == sorted(IDX_NAMES.values())
    # the second time, the files are found and nothing is fetched
    (www / IDX_NAMES["train_x"]).unlink()
    assert ds.load_dataset("mnist", target, mirror=url).size("test") == 20


def test_checksum_mismatch_leaves_no_file(tmp_path: Path, server: tuple[str, Path]) -> None:
    url, www = server
    (www / "file.bin").write_bytes(b"not what was published")
    dest = tmp_path / "out" / "file.bin"
    with pytest.raises(DownloadError, match="does not match the published"):
        download_file(f"{url}/file.bin", dest, "0" * 32)
    assert not dest.exists()
    assert not any(dest.parent.iterdir())  # no partial file either
    assert download_file(f"{url}/file.bin", dest, md5(www / "file.bin")) == dest
    with pytest.raises(DownloadError, match="could not download"):
        download_file(f"{url}/missing.bin", tmp_path / "missing.bin", None)


def test_real_checksums_are_what_mnist_downloads_would_be_verified_against(
    tmp_path: Path, server: tuple[str, Path]
) -> None:
    url, www = server
    write_mnist_like(www, n_train=30, n_test=10)
    with pytest.raises(FileNotFoundError, match="does not match the published f68b3c2d"):
        ds.load_dataset("mnist", tmp_path / "data", mirror=url)


def test_cifar_archive_download_and_safe_extraction(
    tmp_path: Path, server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, www = server
    src = write_cifar(tmp_path / "src", per_batch=10)
    archive = www / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    info = ds.DATASETS.get("cifar10")
    monkeypatch.setitem(
        ds.DATASETS._items,
        "cifar10",
        replace(info, downloads=((info.downloads[0][0], md5(archive)),)),
    )
    data = ds.load_dataset("cifar10", tmp_path / "data", mirror=url)
    assert data.size("test") == 10
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        payload = b"x"
        member = tarfile.TarInfo("../escaped.txt")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    with pytest.raises(DownloadError, match="refusing to extract"):
        extract_tar(evil, tmp_path / "unpack")
    assert not (tmp_path / "escaped.txt").exists()


def test_imagenet_folder_tree(tmp_path: Path) -> None:
    write_image_folders(tmp_path / "imagenet", classes=3, per_class=10, size=20)
    data = ds.load_dataset("imagenet", tmp_path, val_fraction=0.2, image_size=16)
    assert (data.size("train"), data.size("val"), data.size("test")) == (24, 6, 6)
    assert data.info.input_shape == (3, 16, 16)
    assert data.info.num_classes == 3
    a = [x for x, _ in data.batches("train", 8, shuffle=True, seed=1, epoch=0, augment=True)]
    b = [x for x, _ in data.batches("train", 8, shuffle=True, seed=1, epoch=0, augment=True)]
    assert a[0].shape == (8, 3, 16, 16)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    _x, y = next(data.batches("test", 6, shuffle=False, seed=0, epoch=0, augment=False))
    assert sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]


def test_bad_arguments(tmp_path: Path) -> None:
    write_mnist_like(tmp_path, n_train=50, n_test=10)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        ds.load_dataset("mnist", tmp_path, val_fraction=1.0)
    with pytest.raises(
        ValueError, match="unknown dataset 'fashion_mnist'; did you mean 'fashion-mnist'"
    ):
        ds.load_dataset("fashion_mnist", tmp_path)
    with pytest.raises(ValueError, match="image_size applies to imagenet only"):
        ds.load_dataset("mnist", tmp_path, image_size=32)
