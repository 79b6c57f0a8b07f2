import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from medseg.data.discover import discover, resolve_convention
from medseg.errors import DataError, LabelError


@pytest.mark.parametrize("layout,convention,n_files", [
    ("brats2021", "brats2021", 5), ("brats2023", "brats2023", 5), ("msd", "msd", 2)])
def test_layout_detection(dataset, layout, convention, n_files):
    root = dataset(layout, cases=6, test_cases=2)
    ds = discover(root)
    assert ds.layout.name == layout
    assert len(ds.training) == 6 and len(ds.testing) == 2
    assert all(len(c.files) == n_files for c in ds.training)
    assert all(c.label is None for c in ds.testing)
    conv, scans = resolve_convention(ds)
    assert conv.name == convention
    assert len(scans) == 6


def test_brats2023_patient_ids(dataset):
    ds = discover(dataset("brats2023", cases=12))
    for c in ds.cases:
        assert c.case_id.startswith(c.patient_id + "-")
    # the generator gives some patients two time points
    assert len({c.patient_id for c in ds.cases}) < len(ds.cases)


def test_brats2021_channel_order(dataset):
    ds = discover(dataset("brats2021"))
    names = [p.name for p in ds.cases[0].images]
    assert [n.split("_")[-1].split(".")[0] for n in names] == ["t1", "t1ce", "t2", "flair"]


def test_uncompressed_nii_and_macos_junk(dataset, tmp_path):
    src = discover(dataset("brats2021", cases=3)).root
    dst = tmp_path / "plain"
    for f in src.rglob("*.nii.gz"):
        out = dst / f.parent.name / f.name.replace(".nii.gz", ".nii")
        out.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.load(f), out)
        (out.parent / ("._" + out.name)).write_bytes(b"\0junk")   # AppleDouble files are ignored
    ds = discover(dst)
    assert ds.layout.name == "brats2021" and len(ds.training) == 3
    assert all(p.suffix == ".nii" for c in ds.cases for p in c.files)


def _set_label_values(path, mapping):
    img = nib.load(path)
    seg = np.asarray(img.dataobj).copy()
    for old, new in mapping.items():
        seg[seg == old] = new
    nib.save(nib.Nifti1Image(seg, img.affine, img.header), path)


def test_brats2024_resection_cavity_recognised(dataset):
    root = dataset("brats2023", cases=6)
    ds = discover(root)
    case = ds.training[0]
    _set_label_values(case.label, {2: 4})   # edema → RC in one case; other cases keep ET = 3
    conv, _ = resolve_convention(discover(root))
    assert conv.name == "brats2024"
    assert conv.region_labels()["ET"] == (3,)


def test_label_4_without_et_is_an_error_not_an_empty_et(dataset):
    root = dataset("brats2023", cases=6)
    for c in discover(root).training:
        _set_label_values(c.label, {3: 4})   # BraTS 2021 labels under 2023 names
    with pytest.raises(LabelError, match="brats2021") as exc:
        resolve_convention(discover(root))
    assert "BraTS-GLI-" in str(exc.value)


def test_explicit_convention_checks_every_file(dataset):
    root = dataset("brats2021")
    with pytest.raises(LabelError, match="_seg.nii.gz"):
        resolve_convention(discover(root), "msd")


def test_mixed_layouts_error(dataset, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(dataset("brats2021", cases=3), mixed / "a")
    shutil.copytree(dataset("brats2023", cases=3), mixed / "b")
    with pytest.raises(DataError, match="mixes BraTS 2021 and BraTS 2023"):
        discover(mixed)


def test_empty_and_missing_root(tmp_path):
    with pytest.raises(DataError, match="no BraTS or MSD dataset found"):
        discover(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        discover(tmp_path / "nope")


def test_msd_modality_order_checked(dataset):
    root = dataset("msd", cases=3)
    spec = json.loads((root / "dataset.json").read_text())
    spec["modality"] = {"0": "T1w", "1": "FLAIR", "2": "t1gd", "3": "T2w"}
    (root / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match="modality order"):
        discover(root)


def _rename_case(case, new_id):
    """Give a synthetic case another id: its folder and every file name carry the id."""
    folder = case.folder.parent / case.folder.name.replace(case.case_id, new_id)
    case.folder.rename(folder)
    for f in folder.iterdir():
        f.rename(folder / f.name.replace(case.case_id, new_id))


RC = "rc"   # edit: every other edema voxel becomes 4, so a case with 1, 2, 3 gains 4


def _edit_labels(path, edit) -> bool:
    """Relabel by `edit` (a value mapping, or RC); True if any voxel changed."""
    img = nib.load(path)
    seg = np.asarray(img.dataobj).copy()
    before = seg.copy()
    if edit == RC:
        seg.flat[np.flatnonzero(seg == 2)[::2]] = 4
    else:
        for old, new in edit.items():
            seg[before == old] = new
    nib.save(nib.Nifti1Image(seg, img.affine, img.header), path)
    return not np.array_equal(before, seg)


# Label 4 under BraTS 2023+ names is the resection cavity only in GLI cases. Each row:
# id prefix per case index ("*": every case; default BraTS-GLI), label edits per case
# index, --convention, then the convention expected or (error regex, cases named,
# cases not named). Case 5 of the tiny dataset holds labels 1, 2 and 3; RC adds 4.
ALL_3_TO_4 = {i: {3: 4} for i in range(6)}
COHORT_TABLE = [
    ("gli_1234", {}, {5: RC}, None, "brats2024"),
    # a PED-only dataset with label 4: BraTS 2024 PED labels (1 ET, 2 NET, 3 CC, 4 ED)
    ("ped_1234", {"*": "BraTS-PED"}, {5: RC}, None, "brats2024-ped"),
    ("men_1234", {"*": "BraTS-MEN"}, {5: RC}, None, ("MEN labels are 1-3", [5], [0])),
    ("met_123", {"*": "BraTS-MET"}, {}, None, "brats2023"),
    ("ssa_123", {"*": "BraTS-SSA"}, {}, None, "brats2023"),
    ("gli_ped_only_ped_has_4", {5: "BraTS-PED"}, {5: RC}, None, ("outside the GLI", [5], [0, 1])),
    ("gli_ped_both_have_4", {5: "BraTS-PED"}, {5: RC, 1: RC}, None, ("outside the GLI", [5], [1])),
    ("unknown_prefix_with_4", {"*": "UPENN-GBM"}, {5: RC}, None, ("naming no BraTS cohort", [5], [0])),
    ("gli_4_without_3", {}, ALL_3_TO_4, None, ("brats2021", [0], [])),
    ("gli_unknown_value", {}, {0: {2: 7}}, None, (r"\[7\].*--convention", [0], [1])),
    ("explicit_overrides_ped", {"*": "BraTS-PED"}, {5: RC}, "brats2024", "brats2024"),
    ("explicit_overrides_4_without_3", {}, ALL_3_TO_4, "brats2021", "brats2021"),
    ("explicit_checks_each_ped_file", {"*": "BraTS-PED"}, {5: RC}, "brats2023",
     (r"-seg\.nii\.gz.*cystic component", [5], [0])),
]


@pytest.mark.parametrize("prefixes,edits,convention,expected",
                         [r[1:] for r in COHORT_TABLE], ids=[r[0] for r in COHORT_TABLE])
def test_label_4_read_by_cohort(dataset, prefixes, edits, convention, expected):
    root = dataset("brats2023", cases=6)
    cases = discover(root).training
    ids = []
    for i, case in enumerate(cases):
        prefix = prefixes.get(i, prefixes.get("*"))
        if i in edits:
            changed = _edit_labels(case.label, edits[i])
            assert changed or edits is ALL_3_TO_4, "edit changed nothing"   # (not every case has 3)
        if i == 5 and edits.get(5) == RC:
            assert set(np.unique(np.asarray(nib.load(case.label).dataobj))) == {0, 1, 2, 3, 4}
        if prefix:
            _rename_case(case, case.case_id.replace("BraTS-GLI", prefix))
        ids.append(case.case_id.replace("BraTS-GLI", prefix) if prefix else case.case_id)
    ds = discover(root)
    assert sorted(c.case_id for c in ds.training) == sorted(ids)
    if isinstance(expected, str):
        conv, _ = resolve_convention(ds, convention)
        assert conv.name == expected
        return
    pattern, named, not_named = expected
    with pytest.raises(LabelError, match=pattern) as exc:
        resolve_convention(ds, convention)
    msg = str(exc.value)
    assert "--convention" in msg
    assert all(ids[i] in msg for i in named), msg
    assert not any(ids[i] in msg for i in not_named), msg


def test_data_check_names_label_4_outside_gli(dataset):
    # `medseg data check` reports the PED case's label file as an error (it used to
    # read the folder as BraTS 2024 GLI post-treatment data and report nothing).
    from medseg.data.validate import check_dataset
    root = dataset("brats2023")
    cases = discover(root).cases
    assert _edit_labels(cases[5].label, RC)
    _rename_case(cases[5], cases[5].case_id.replace("BraTS-GLI", "BraTS-PED"))
    ped = cases[5].case_id.replace("BraTS-GLI", "BraTS-PED")
    report = check_dataset(root)
    errors = [f for f in report.findings if f.level == "error"]
    assert [f.case_id for f in errors] == [ped]
    assert "-seg.nii.gz" in str(errors[0].path) and "cystic component" in errors[0].message
