"""A top-K file is checked from its arrays' headers before any array is decompressed (a zip bomb stays unread)."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from cirlab.core import topk as topk_module
from cirlab.core.topk import TopK, load_topk, save_topk


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _header_only(shape: tuple[int, ...], dtype: str) -> bytes:
    """A .npy member declaring ``shape`` without its data (what a crafted file can claim)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _archive(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _one_query(**override: bytes) -> dict[str, bytes]:
    members = {"query_ids.npy": _npy(np.array(["q0"])), "gallery_ids.npy": _npy(np.array([["a", "b"]])),
               "scores.npy": _npy(np.array([[0.9, 0.1]], np.float32)), "target_rank.npy": _npy(np.array([1]))}
    return {**members, **override}


def test_the_crafted_archive_loads_when_it_is_consistent(tmp_path):
    back = load_topk(_archive(tmp_path / "ok.topk.npz", _one_query()))
    assert back.k == 2 and back.query_ids.tolist() == ["q0"]


@pytest.mark.parametrize("member,shape,dtype,pattern", [
    ("scores.npy", (1000, 1000), "<f4", r"scores declares shape \(1000, 1000\), expected \[1 queries, K\]"),
    ("gallery_ids.npy", (1, 4000), "<U8", r"gallery_ids declares shape \(1, 4000\) and scores \(1, 2\): they differ"),
    ("target_rank.npy", (50000,), "<i8", r"target_rank declares shape \(50000,\), but query_ids declares 1 queries"),
    ("category.npy", (1, 1), "<U5", r"category declares shape \(1, 1\), but query_ids declares 1 queries"),
    ("query_ids.npy", (2, 3), "<U2", r"query_ids declares shape \(2, 3\), expected \[Q\]"),
    ("meta.npy", (9000,), "<U9", r"meta declares shape \(9000,\), expected one JSON string"),
])
def test_declared_shapes_that_do_not_fit_are_refused_unread(tmp_path, member, shape, dtype, pattern):
    """The member has a header and no data: loading its data first would fail only after reading it all."""
    path = _archive(tmp_path / "bad.topk.npz", _one_query(**{member: _header_only(shape, dtype)}))
    with pytest.raises(ValueError, match=r"bad\.topk\.npz: " + pattern):
        load_topk(path)


def test_an_archive_inflating_far_beyond_its_size_is_refused_unread(tmp_path, monkeypatch):
    # consistent shapes, but zeros inflate a thousand times: the limits are lowered to keep the test small
    topk = TopK([""] * 200, np.full((200, 50), "", dtype="<U40"), np.zeros((200, 50), np.float32), [0] * 200)
    path = save_topk(tmp_path / "zeros.topk.npz", topk)
    assert load_topk(path).k == 50
    monkeypatch.setattr(topk_module, "_MAX_PLAIN_BYTES", 2 ** 10)
    monkeypatch.setattr(topk_module, "_MAX_RATIO", 20)
    with pytest.raises(ValueError, match=r"zeros\.topk\.npz: loading its arrays would take .* MiB, \d+ times the "):
        load_topk(path)


def _streamed_zeros(archive: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: str) -> None:
    """A member holding ``shape`` zeros of ``dtype``, written a MiB at a time (never allocated whole)."""
    with archive.open(name, "w", force_zip64=True) as fh:
        fh.write(_header_only(shape, dtype))
        left = int(np.prod(shape)) * np.dtype(dtype).itemsize
        chunk = bytes(2 ** 20)
        while left > 0:
            fh.write(chunk[:left])
            left -= len(chunk)


def test_the_bomb_check_counts_what_loading_takes_not_what_is_declared(tmp_path):
    """1M queries declare 12 MiB (far under the old 256 MiB cap), but TopK copies the ids and the ranks and builds
    the missing category and target_ids as lists: about 48 MiB, from a file of a few KiB."""
    q = 2 ** 20
    path = tmp_path / "wide.topk.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        _streamed_zeros(archive, "query_ids.npy", (q,), "<U1")
        _streamed_zeros(archive, "target_rank.npy", (q,), "<i8")
        archive.writestr("gallery_ids.npy", _header_only((q, 0), "<U1"))
        archive.writestr("scores.npy", _header_only((q, 0), "<f4"))
    assert path.stat().st_size < 2 ** 16
    with pytest.raises(ValueError, match=r"wide\.topk\.npz: loading its arrays would take 4\d MiB, \d+ times the "
                                         r"file's 0\.0 MiB; .* refused unread"):
        load_topk(path)


@pytest.mark.parametrize("member,shape,dtype,want", [
    ("query_ids.npy", (1,), "|i1", "a string dtype"),  # astype(str) made each byte a 16-byte string
    ("gallery_ids.npy", (1, 2), "<f8", "a string dtype"),
    ("target_rank.npy", (1,), "<f8", "an integer dtype"),
    ("scores.npy", (1, 2), "<U3", "a float dtype"),
    ("category.npy", (1,), "<i8", "a string dtype"),
    ("target_ids.npy", (1,), "|b1", "a string dtype"),
    ("meta.npy", (), "<f8", "a JSON string"),
])
def test_a_dtype_cirlab_never_writes_is_refused_unread(tmp_path, member, shape, dtype, want):
    path = _archive(tmp_path / "odd.topk.npz", _one_query(**{member: _header_only(shape, dtype)}))
    field = member.removesuffix(".npy")
    with pytest.raises(ValueError, match=rf"odd\.topk\.npz: {field} declares dtype {np.dtype(dtype)}, expected {want}"):
        load_topk(path)


def _written(q: int, k: int, name_length: int) -> TopK:
    names = np.array([f"{i:06d}".rjust(name_length, "x") for i in range(max(q * k, 1))])
    rng = np.random.default_rng(0)
    gallery = rng.choice(names, size=(q, k))
    return TopK([f"dress:{i}" for i in range(q)], gallery, rng.random((q, k), np.float32), np.arange(q),
                ["dress"] * q, gallery[:, 0] if k else [""] * q, {"model": "amc", "k": k})


@pytest.mark.parametrize("q,k,name_length", [(300, 50, 8), (300, 50, 190), (0, 0, 8), (5, 0, 8), (0, 5, 8)])
def test_files_cirlab_writes_pass_the_ratio_without_the_floor(tmp_path, monkeypatch, q, k, name_length):
    """Long names (stored as 4-byte characters) compress best of what a real file holds; K = 0 and Q = 0 load too."""
    path = save_topk(tmp_path / "real.topk.npz", _written(q, k, name_length))
    monkeypatch.setattr(topk_module, "_MAX_PLAIN_BYTES", 0)
    back = load_topk(path)
    assert (len(back), back.k) == (q, k)


def test_a_member_that_is_no_npy_array_is_named(tmp_path):
    path = _archive(tmp_path / "raw.topk.npz", _one_query(**{"scores.npy": b"not an array"}))
    with pytest.raises(ValueError, match=r"raw\.topk\.npz: scores\.npy is not a NumPy array"):
        load_topk(path)


def test_a_file_with_one_long_gallery_name_loads():
    """numpy pads every id to the longest one, and the padding compresses to nearly nothing: a file cirlab wrote with
    one 255-character name among short ones took 262 times its size by the estimate and was refused as a bomb."""
    import tempfile
    from pathlib import Path

    import numpy as np
    import torch

    from cirlab.core.retrieval import make_topk
    from cirlab.core.topk import load_topk, save_topk

    gen = torch.Generator().manual_seed(0)
    q, k, g = 200, 100, 200  # about 280 times the file's size by the estimate
    names = [f"g{i}" for i in range(g - 1)] + ["x" * 255]
    scores = torch.rand(q, k, generator=gen).to(torch.bfloat16).float().sort(dim=1, descending=True)[0]
    idx = torch.randint(0, g, (q, k), generator=gen)
    idx[0, 0] = g - 1
    topk = make_topk(scores, idx, query_ids=[f"q{i}" for i in range(q)], gallery_ids=names,
                     target=torch.randint(0, g, (q,), generator=gen), ranks=torch.randint(1, g, (q,), generator=gen))
    with tempfile.TemporaryDirectory() as folder:
        path = save_topk(Path(folder) / "long.topk.npz", topk)
        assert load_topk(path).gallery_ids[0, 0] == "x" * 255
        assert np.array_equal(load_topk(path).scores, topk.scores)


def _split_file(folder, split: str, category: str, rank: int):
    topk = TopK(np.array([f"{split}-{category}"]), np.array([["a", "b"]]), np.array([[0.9, 0.1]]), np.array([rank]),
                np.array([category]), np.array(["a"]), {"split": split})
    return save_topk(folder / f"{split}_{category}.topk.npz", topk)


def test_a_runs_topk_folder_is_read_one_split_at_a_time(tmp_path):
    """A run's topk/ holds val_* and test_* files: read together they were one ranking of both splits' queries,
    labelled with the first file's split, and its recall mixed the two."""
    from cirlab.core.errors import InputError
    from cirlab.workbench import load_topk_files

    for split, rank in (("val", 1), ("test", 2)):
        for category in ("dress", "shirt"):
            _split_file(tmp_path, split, category, rank)
    with pytest.raises(InputError, match=r"several splits \('test', 'val'\).*split='val'"):
        load_topk_files(tmp_path)
    val = load_topk_files(tmp_path, split="val")
    assert sorted(val.query_ids) == ["val-dress", "val-shirt"] and set(val.target_rank) == {1}
    assert val.meta["split"] == "val" and len(val.meta["files"]) == 2
    with pytest.raises(FileNotFoundError, match=r"no top-K file of split 'dev'.*'test', 'val'"):
        load_topk_files(tmp_path, split="dev")
    with pytest.raises(InputError, match=r"is a folder, not a top-K file.*load_topk_files"):
        load_topk(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"val_dress.topk.npz is a top-K file of split 'val', not 'test'"):
        load_topk_files(tmp_path / "val_dress.topk.npz", split="test")
