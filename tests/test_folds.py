import json
from pathlib import Path

import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from medseg.cli import main
from medseg.data.folds import assign_folds, load_datalist, write_datalist
from medseg.errors import DataError, MedsegError

REPO = Path(__file__).resolve().parents[1]


def _toy(n_patients=30, two_points=(3, 7, 11)):
    ids, pats, vols = [], [], []
    rng = np.random.default_rng(1)
    for p in range(n_patients):
        for t in range(2 if p in two_points else 1):
            ids.append(f"BraTS-GLI-{p:05d}-{t:03d}")
            pats.append(f"BraTS-GLI-{p:05d}")
            vols.append(float(rng.lognormal(3, 1)))
    return ids, pats, vols


def test_folds_deterministic_disjoint_complete():
    ids, pats, vols = _toy()
    a = assign_folds(ids, pats, vols, 5, seed=0)
    assert a == assign_folds(ids, pats, vols, 5, seed=0)
    assert a != assign_folds(ids, pats, vols, 5, seed=1)
    assert sorted(a) == sorted(ids)                      # every case exactly once
    assert set(a.values()) == set(range(5))
    sizes = np.bincount(list(a.values()))
    assert sizes.max() - sizes.min() <= 2


def test_folds_independent_of_input_order():
    ids, pats, vols = _toy()
    rev = assign_folds(ids[::-1], pats[::-1], vols[::-1], 5, seed=3)
    assert rev == assign_folds(ids, pats, vols, 5, seed=3)


def test_patient_time_points_share_a_fold():
    ids, pats, vols = _toy()
    a = assign_folds(ids, pats, vols, 5, seed=0)
    for p in set(pats):
        assert len({a[i] for i, q in zip(ids, pats) if q == p}) == 1


def test_tumour_size_is_balanced():
    ids, pats, vols = _toy(60, ())
    a = assign_folds(ids, pats, vols, 5, seed=0)
    edges = np.quantile(vols, [1 / 3, 2 / 3])
    bins = np.searchsorted(edges, vols, side="right")
    for k in range(5):
        counts = np.bincount(bins[[a[i] == k for i in ids]], minlength=3)
        assert counts.min() >= 3, counts   # 12 cases per fold → 4 of each size third


def test_fewer_patients_than_folds_is_an_error():
    with pytest.raises(MedsegError, match="5 folds need at least 5 patients"):
        assign_folds(["a", "b", "c"], ["a", "b", "c"], [1.0, 2.0, 3.0], 5, 0)


@pytest.mark.parametrize("layout", ["brats2021", "brats2023", "msd"])
def test_split_writes_a_monai_datalist(dataset, tmp_path, layout):
    root = dataset(layout, cases=10, test_cases=2)
    out = tmp_path / "dl.json"
    assert main(["data", "split", "--root", str(root), "--folds", "5", "--out", str(out)]) == 0
    dl = load_datalist(out)
    assert dl["num_folds"] == 5 and dl["layout"] == layout
    assert dl["channels"] == (["flair", "t1", "t1ce", "t2"] if layout == "msd"
                              else ["t1", "t1ce", "t2", "flair"])
    assert dl["label_convention"]["name"] == layout
    assert len(dl["testing"]) == 2
    for entry in dl["training"]:
        assert not Path(entry["label"]).is_absolute()
    # MONAI reads it as is, resolving paths against the data root
    items = load_decathlon_datalist(str(out), data_list_key="training", base_dir=str(root))
    assert len(items) == 10
    for it in items:
        imgs = it["image"] if isinstance(it["image"], list) else [it["image"]]
        assert all(Path(p).is_file() for p in imgs) and Path(it["label"]).is_file()
        assert it["fold"] in range(5)


def test_split_refuses_to_change_an_existing_datalist(dataset, tmp_path, capsys):
    root = dataset("brats2021", cases=10)
    out = tmp_path / "dl.json"
    args = ["data", "split", "--root", str(root), "--out", str(out)]
    assert main(args) == 0
    first = out.read_text()
    assert main(args) == 0 and "unchanged" in capsys.readouterr().out
    assert main(args + ["--seed", "9"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_text() == first
    assert main(args + ["--seed", "9", "--overwrite"]) == 0
    assert json.loads(out.read_text())["seed"] == 9


def test_split_too_few_cases(dataset, tmp_path, capsys):
    root = dataset("brats2021", cases=3)
    assert main(["data", "split", "--root", str(root), "--folds", "5",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "5 folds need at least 5 patients" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_split_refuses_incomplete_cases(dataset, tmp_path):
    root = dataset("brats2021", cases=6)
    next(root.rglob("*_t2.nii.gz")).unlink()
    with pytest.raises(DataError, match="miss files"):
        from medseg.data.discover import discover, resolve_convention
        from medseg.data.folds import build_datalist
        ds = discover(root)
        build_datalist(ds, *resolve_convention(ds), 5, 0)


def test_write_datalist_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "dl.json"
    out.write_text('{"old": true}')
    import medseg.data.io as io

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(io.json, "dumps", boom)
    with pytest.raises(RuntimeError):
        write_datalist({"new": 1}, out, overwrite=True)
    assert out.read_text() == '{"old": true}'
    assert list(tmp_path.iterdir()) == [out]           # no temporary file left behind


@pytest.mark.slow   # over 10 s on 2 cores: `make test-slow`
def test_committed_demo_datalist_matches_the_generator(tmp_path):
    """data_lists/demo_brats2023.json is what the demo regenerates (generator + split unchanged)."""
    from medseg.demo import DEMO, demo_datalist
    from medseg.data.synth import synthesize
    committed = json.loads((REPO / "data_lists" / "demo_brats2023.json").read_text())
    root = tmp_path / "brats2023"
    synthesize(root, DEMO["cases"], DEMO["layout"], DEMO["seed"], DEMO["shape"])
    assert demo_datalist(root) == committed
