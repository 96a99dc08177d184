"""Tests for radioactive.marking: the optimisation (mark_batch) and folder marking (mark_folder).

Real CIFAR-10 images only; few steps and small batches to stay fast on CPU.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from radioactive.data import list_image_folder, load_rgb
from radioactive.errors import RadioactiveError
from radioactive.keys import Key
from radioactive.marking import MarkingConfig, image_generator, mark_batch, mark_folder, output_name, psnr_db, select_marked

FAST = MarkingConfig(steps=3, batch_size=16)


def _gens(names, seed=0):
    return [image_generator(seed, n) for n in names]


# ----------------------------------------------------------------------------- mark_batch


@pytest.fixture(scope="module")
def marked10(marking_net, key, real_batch):
    """The 8 real images marked with 10 steps at linf = 10 and at linf = 3."""
    net, _ = marking_net
    x, labels, names = real_batch
    u = key.carriers[labels]
    return {linf: mark_batch(net, x, u, MarkingConfig(steps=10, linf=linf), _gens(names)) for linf in (10, 3)}


@pytest.mark.parametrize("linf", [10, 3])
def test_mark_batch_dtype_shape_and_linf(marked10, real_batch, linf):
    x = real_batch[0]
    m = marked10[linf]
    assert m.dtype == torch.uint8 and m.shape == x.shape
    diff = (m.int() - x.int()).abs()
    assert diff.max() <= linf
    # 10 Adam steps of 0.5/255 move some pixels by more than 3 levels: the radius 3 binds, 10 does not
    # (Adam moves a pixel by at most lr = 0.5/255 per step: at most 5 levels in 10 steps)
    if linf == 3:
        assert diff.max() == 3
    else:
        assert 3 < diff.max() <= 5
    assert (diff > 0).float().mean() > 0.2  # a spread perturbation, not a few pixels


def test_mark_batch_moves_features_along_own_carrier(marking_net, key, marked10, real_batch):
    net, _ = marking_net
    x, labels, _ = real_batch
    u = key.carriers[labels]
    with torch.no_grad():
        shift = net.features(marked10[10].float() / 255) - net.features(x.float() / 255)
    own = (shift * u).sum(1)  # (8,)
    # 500 draws of one random unit direction per image: the mean projection of the 8 shifts
    g = torch.Generator().manual_seed(3)
    rand = torch.nn.functional.normalize(torch.randn(500, 8, 1280, generator=g), dim=2)
    rand_means = (rand * shift).sum(2).mean(1)
    assert own.mean() > rand_means.max(), (own, rand_means.max())
    assert (own > 0).sum() >= 7
    # the carrier of another class is not what moved: own carriers beat a cyclic shift of them
    other = (shift * key.carriers[(labels + 1) % 10]).sum(1)
    assert own.mean() > other.mean()


def test_mark_batch_zero_steps_is_identity(marking_net, key, real_batch):
    net, _ = marking_net
    x, labels, names = real_batch
    out = mark_batch(net, x, key.carriers[labels], MarkingConfig(steps=0), _gens(names))
    assert torch.equal(out, x)


def test_mark_batch_is_deterministic_given_generators(marking_net, key, real_batch):
    net, _ = marking_net
    x, labels, names = real_batch
    cfg = MarkingConfig(steps=2)
    a = mark_batch(net, x[:2], key.carriers[labels[:2]], cfg, _gens(names[:2]))
    b = mark_batch(net, x[:2], key.carriers[labels[:2]], cfg, _gens(names[:2]))
    assert torch.equal(a, b)


def test_mark_batch_is_batch_size_invariant(marking_net, key, real_batch):
    net, _ = marking_net
    x, labels, names = real_batch
    x, labels, names = x[:4], labels[:4], names[:4]
    cfg = MarkingConfig(steps=4, round_every=2)
    together = mark_batch(net, x, key.carriers[labels], cfg, _gens(names))
    split = torch.cat([mark_batch(net, x[s], key.carriers[labels[s]], cfg, _gens(names[s]))
                       for s in (slice(0, 2), slice(2, 4))])
    diff = (together.int() - split.int()).abs()
    assert diff.max() <= 1
    assert (diff == 0).float().mean() >= 0.99
    assert not torch.equal(together, x)  # and the images were marked at all


def test_mark_batch_refuses_train_mode(marking_net, key, real_batch):
    net = copy.deepcopy(marking_net[0]).train()  # never touch the shared network's mode
    x, labels, names = real_batch
    with pytest.raises(RadioactiveError, match="eval"):
        mark_batch(net, x[:2], key.carriers[labels[:2]], MarkingConfig(steps=1), _gens(names[:2]))


@pytest.mark.parametrize("kwargs", [{"linf": 0}, {"linf": 256}, {"steps": -1}, {"batch_size": 0},
                                    {"round_every": 0}, {"lr": 0.0}, {"lambda_img": -1.0}])
def test_marking_config_rejects_bad_values(kwargs):
    with pytest.raises(RadioactiveError):
        MarkingConfig(**kwargs)


def test_psnr_db():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    assert psnr_db(a, b) == math.inf
    b[0, 0, 0] = 255  # mse = 255^2 / 48
    assert psnr_db(a, b) == pytest.approx(10 * math.log10(48))


def test_image_generator_depends_on_seed_and_name():
    def first(g):
        return torch.rand(3, generator=g)

    assert torch.equal(first(image_generator(0, "cat/1.jpg")), first(image_generator(0, "cat/1.jpg")))
    assert not torch.equal(first(image_generator(0, "cat/1.jpg")), first(image_generator(1, "cat/1.jpg")))
    assert not torch.equal(first(image_generator(0, "cat/1.jpg")), first(image_generator(0, "cat/2.jpg")))


# ----------------------------------------------------------------------------- mark_folder


def _snapshot(root: Path) -> dict:
    """relative path -> (sha256, mtime_ns, size) of every file under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[p.relative_to(root).as_posix()] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns,
                                                   st.st_size)
    return out


@pytest.fixture(scope="module")
def uneven_source(cifar_small, tmp_path_factory):
    """A copy of the small train split with 12 - (k % 4) images in class k, plus a non-image file."""
    root = tmp_path_factory.mktemp("uneven") / "train"
    shutil.copytree(cifar_small[0], root)
    folder = list_image_folder(root)
    for k in range(len(folder.classes)):
        files = [f for f, lab in zip(folder.files, folder.labels) if lab == k]
        for f in files[:k % 4]:
            (root / f).unlink()
    (root / folder.classes[0] / "notes.txt").write_text("not an image\n")
    return root


Q = 0.3


@pytest.fixture(scope="module")
def marked_run(uneven_source, key, tmp_path_factory):
    out_parent = tmp_path_factory.mktemp("released")
    before = _snapshot(uneven_source)
    summary = mark_folder(uneven_source, key, out_parent / "copy", fraction=Q, seed=5, config=FAST, progress=False)
    after = _snapshot(uneven_source)
    return {"summary": summary, "output": out_parent / "copy", "before": before, "after": after}


def _record(path):
    lines = [json.loads(s) for s in Path(path).read_text().splitlines()]
    return lines[0], lines[1:]


def test_mark_folder_writes_every_image_once_as_png(marked_run, uneven_source):
    folder = list_image_folder(uneven_source)
    out = marked_run["output"]
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(output_name(f) for f in folder.files)
    assert all(w.endswith(".png") for w in written)
    assert [Path(w).with_suffix("").as_posix() for w in written] == sorted(
        Path(f).with_suffix("").as_posix() for f in folder.files)
    assert "notes.txt" not in " ".join(written)  # non-images are listed as ignored, not copied
    s = marked_run["summary"]
    assert s.num_images == len(folder) == s.num_marked + s.num_copied
    assert s.ignored == [f"{folder.classes[0]}/notes.txt"]


def test_mark_folder_marks_round_q_nk_per_class(marked_run, uneven_source):
    folder = list_image_folder(uneven_source)
    counts = np.bincount(folder.labels, minlength=10)
    assert len(set(counts.tolist())) > 1  # the classes really are uneven
    expected = sum(int(round(Q * n)) for n in counts)
    s = marked_run["summary"]
    assert s.num_marked == expected
    _, entries = _record(s.record)
    assert len(entries) == expected
    per_class = {c: sum(e["class"] == c for e in entries) for c in folder.classes}
    assert per_class == {c: int(round(Q * n)) for c, n in zip(folder.classes, counts)}


def test_mark_folder_unmarked_images_keep_exact_pixels(marked_run, uneven_source):
    folder = list_image_folder(uneven_source)
    _, entries = _record(marked_run["summary"].record)
    marked = {e["source"] for e in entries}
    n_checked = 0
    for f in folder.files:
        vanilla = load_rgb(uneven_source / f)
        released = load_rgb(marked_run["output"] / output_name(f))
        assert released.shape == vanilla.shape
        if f in marked:
            assert not np.array_equal(released, vanilla), f
        else:
            np.testing.assert_array_equal(released, vanilla)
            n_checked += 1
    assert n_checked == marked_run["summary"].num_copied > 0


def test_mark_folder_record(marked_run, key, uneven_source):
    s = marked_run["summary"]
    out = marked_run["output"]
    assert Path(s.record) == out.parent / "copy.record.jsonl" and not Path(s.record).is_relative_to(out)
    header, entries = _record(s.record)
    assert header["kind"] == "radioactive-record" and header["key_fingerprint"] == key.fingerprint
    assert header["fraction"] == Q and header["seed"] == 5 and header["config"]["steps"] == FAST.steps
    assert len({e["source"] for e in entries}) == len(entries)
    for e in entries:
        data = (out / e["output"]).read_bytes()
        assert e["output"] == output_name(e["source"])
        assert e["sha256"] == hashlib.sha256(data).hexdigest()
        vanilla = load_rgb(uneven_source / e["source"])
        released = load_rgb(out / e["output"])
        linf = int(np.abs(vanilla.astype(int) - released.astype(int)).max())
        assert e["linf"] == linf and 1 <= linf <= FAST.linf
        assert e["psnr_db"] == pytest.approx(psnr_db(vanilla, released), abs=1e-3)
        assert key.classes[e["carrier_index"]] == e["class"] == e["source"].split("/")[0]
    assert s.linf_max == max(e["linf"] for e in entries) <= FAST.linf
    assert s.psnr_db_mean == pytest.approx(np.mean([e["psnr_db"] for e in entries]), abs=1e-3)


def test_mark_folder_leaves_source_untouched(marked_run):
    assert marked_run["before"] == marked_run["after"]
    assert len(marked_run["before"]) > 100


def test_mark_folder_selection_is_seeded(uneven_source):
    folder = list_image_folder(uneven_source)
    a = select_marked(folder, Q, seed=5)
    assert a == select_marked(folder, Q, seed=5)
    assert a != select_marked(folder, Q, seed=6)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(RadioactiveError):
            select_marked(folder, bad, seed=0)


def test_mark_folder_refuses_output_inside_source(uneven_source, key):
    for out in (uneven_source / "released", uneven_source / "airplane" / "released", uneven_source):
        existed = out.exists()
        with pytest.raises(RadioactiveError, match="inside the source"):
            mark_folder(uneven_source, key, out, record=uneven_source.parent / "r.jsonl", fraction=Q,
                        config=FAST, progress=False)
        assert out.exists() == existed


def test_mark_folder_refuses_non_empty_output(uneven_source, key, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    (out / "old.txt").write_text("previous release\n")
    with pytest.raises(RadioactiveError, match="not empty"):
        mark_folder(uneven_source, key, out, files=["airplane/0003.jpg"], config=FAST, progress=False)
    # --overwrite deletes only files a mark run writes: a foreign file is refused, not deleted or released
    with pytest.raises(RadioactiveError, match="old.txt"):
        mark_folder(uneven_source, key, out, files=["airplane/0003.jpg"], config=FAST, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    (out / "old.txt").unlink()
    (out / "airplane").mkdir()
    (out / "airplane" / "0003.png").write_bytes(b"a previous run's file")
    summary = mark_folder(uneven_source, key, out, files=["airplane/0003.jpg"], config=FAST, overwrite=True,
                          progress=False)
    assert summary.num_marked == 1 and load_rgb(out / "airplane" / "0003.png").shape == (32, 32, 3)


def test_mark_folder_refuses_to_mark_nothing(uneven_source, key, tmp_path):
    """A fraction that rounds to no image in any class, or an empty list, is refused before anything is written."""
    for kwargs, reason in (({"fraction": 0.01}, "rounds to 0 images"), ({"files": []}, "list of files is empty")):
        with pytest.raises(RadioactiveError, match=reason):
            mark_folder(uneven_source, key, tmp_path / "copy", config=FAST, progress=False, **kwargs)
        assert not (tmp_path / "copy").exists()


def test_mark_folder_refuses_key_with_other_classes(uneven_source, key, tmp_path):
    shuffled = Key(key.carriers, tuple(reversed(key.classes)), key.network)
    renamed = Key(key.carriers, key.classes[:-1] + ("zebra",), key.network)
    fewer = Key(key.carriers[:9], key.classes[:9], key.network)
    for other in (shuffled, renamed, fewer):
        with pytest.raises(RadioactiveError, match="differ from the key"):
            mark_folder(uneven_source, other, tmp_path / "copy", fraction=Q, config=FAST, progress=False)
    assert not (tmp_path / "copy").exists()


def test_mark_folder_refuses_record_inside_output(uneven_source, key, tmp_path):
    for record in (tmp_path / "copy" / "record.jsonl", tmp_path / "copy" / "sub" / "r.jsonl"):
        with pytest.raises(RadioactiveError, match="outside the released copy"):
            mark_folder(uneven_source, key, tmp_path / "copy", record=record, fraction=Q, config=FAST,
                        progress=False)
    assert not (tmp_path / "copy").exists()


def test_mark_folder_needs_exactly_one_of_fraction_and_files(uneven_source, key, tmp_path):
    with pytest.raises(RadioactiveError, match="either"):
        mark_folder(uneven_source, key, tmp_path / "a", config=FAST, progress=False)
    with pytest.raises(RadioactiveError, match="either"):
        mark_folder(uneven_source, key, tmp_path / "b", fraction=Q, files=["airplane/0003.jpg"], config=FAST,
                    progress=False)


def test_mark_folder_explicit_files(uneven_source, key, tmp_path):
    folder = list_image_folder(uneven_source)
    chosen = [folder.files[3], folder.files[40], folder.files[77]]
    out = tmp_path / "copy"
    record = tmp_path / "private" / "rec.jsonl"
    summary = mark_folder(uneven_source, key, out, record=record, files=chosen + [chosen[0]], seed=1, config=FAST,
                          progress=False)
    assert summary.record == str(record) and summary.num_marked == 3
    assert summary.num_copied == len(folder) - 3
    header, entries = _record(record)
    assert header["fraction"] is None
    assert sorted(e["source"] for e in entries) == sorted(chosen)
    for f in folder.files:
        same = np.array_equal(load_rgb(uneven_source / f), load_rgb(out / output_name(f)))
        assert same == (f not in chosen), f


def test_mark_folder_unknown_listed_file_raises(uneven_source, key, tmp_path):
    for files in (["bird/does-not-exist.jpg"], ["airplane/0003.jpg", "airplane/notes.txt"], ["airplane/0003.png"]):
        with pytest.raises(RadioactiveError, match="not images of"):
            mark_folder(uneven_source, key, tmp_path / "copy", files=files, config=FAST, progress=False)
    assert not (tmp_path / "copy").exists()


def test_mark_folder_same_stem_different_extension(cifar_small, key, tmp_path):
    src = tmp_path / "src"
    folder = list_image_folder(cifar_small[0])
    for k, c in enumerate(folder.classes):  # one image per class
        first = next(f for f, lab in zip(folder.files, folder.labels) if lab == k)
        (src / c).mkdir(parents=True)
        shutil.copyfile(cifar_small[0] / first, src / c / "x.jpg")
    # a different image under the same stem, as PNG
    other = next(f for f, lab in zip(folder.files, folder.labels) if lab == 0 and f != folder.files[0])
    from PIL import Image
    Image.open(cifar_small[0] / other).save(src / folder.classes[0] / "x.png")
    n_source = len(list_image_folder(src))
    out = tmp_path / "copy"
    try:
        summary = mark_folder(src, key, out, files=[f"{folder.classes[1]}/x.jpg"], config=FAST, progress=False)
    except RadioactiveError:
        return  # refusing the ambiguous layout is fine too
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) == n_source == summary.num_images
